"""The example project's demo view, ``POST /demo/payouts/``: the README shows its answer as
what the data plane receives for a request, so it must answer with exactly the messages the
request wrote, context included."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.conf import settings as django_settings

from django_cdp.middleware import MIDDLEWARE_PATH
from example_project.payouts.models import Payout
from example_project.shops.models import Shop

VISITOR = "39ee7ea5-b6d8-4174-b612-04e1ef3fa952"
SAFARI = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15"


@pytest.fixture
def example_urls(settings):
    """The example project's URLs and its request-context middleware, over tests.settings."""
    settings.ROOT_URLCONF = "example_project.urls"
    settings.MIDDLEWARE = [*django_settings.MIDDLEWARE, MIDDLEWARE_PATH]
    settings.ALLOWED_HOSTS = ["localhost", "testserver"]


def test_the_demo_answers_with_the_messages_its_change_wrote(
    client, example_urls, shop, outbox, engine
):
    client.cookies["ajs_anonymous_id"] = VISITOR
    response = client.post(
        "/demo/payouts/?utm_source=newsletter",
        HTTP_HOST="localhost",
        REMOTE_ADDR="203.0.113.24",
        HTTP_USER_AGENT=SAFARI,
        HTTP_REFERER="http://localhost/admin/payouts/payout/",
        HTTP_ACCEPT_LANGUAGE="en-GB,en;q=0.8",
        HTTP_X_REQUEST_ID="7f1c9e2a",
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    answered = json.loads(response.content, parse_float=Decimal)["messages"]
    assert answered == outbox.all()  # what the request wrote, as stored to be sent
    [payout] = Payout.objects.filter(shop=shop)
    [track] = [m for m in answered if m["type"] == "track"]
    assert track["event"] == "Payout Created"
    assert track["properties"]["id"] == payout.pk
    assert track["userId"] == str(shop.pk)
    assert track["anonymousId"] == VISITOR
    assert track["context"] == {
        "ip": "203.0.113.24",
        "userAgent": SAFARI,
        "page": {
            "path": "/demo/payouts/",
            "url": "http://localhost/demo/payouts/?utm_source=newsletter",
            "search": "?utm_source=newsletter",
            "referrer": "http://localhost/admin/payouts/payout/",
        },
        "locale": "en-GB",
        "requestId": "7f1c9e2a",
        "library": track["context"]["library"],
    }


def test_the_demo_leaves_out_messages_written_before_it(client, example_urls, shop, outbox):
    shop.email = "billing@acme.example"
    shop.save()  # an identify, in the outbox before the request
    before = len(outbox.all())
    response = client.post("/demo/payouts/")
    answered = json.loads(response.content)["messages"]
    assert [m["event"] for m in answered] == ["Payout Created"]
    assert len(outbox.all()) == before + 1


def test_the_demo_without_a_shop_says_what_to_run(client, example_urls, db):
    assert not Shop.objects.exists()
    response = client.post("/demo/payouts/")
    assert response.status_code == 404
    assert b"seed_demo" in response.content
    assert not Payout.objects.exists()
