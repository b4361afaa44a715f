"""The live events page and its JSON endpoint."""

from __future__ import annotations

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_cdp import admin as cdp_admin
from django_cdp.models import Message
from tests.admin.conftest import create_message, make_message

LIVE = reverse("admin:django_cdp_message_live")
DATA = reverse("admin:django_cdp_message_live_data")


def test_live_page_polls_the_endpoint_without_a_framework(admin_client_):
    response = admin_client_.get(LIVE)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="cdp-live-toggle"' in html and 'id="cdp-live-filter"' in html
    assert DATA in html
    assert "<script src=" not in html.split('id="content"')[1]  # inline, vanilla JS only


def test_data_newest_first_and_after(admin_client_):
    a = create_message(event="Payout Created", properties={"amount": "1.00"})
    b = create_message(event="Shop Updated", user_id="9")
    data = admin_client_.get(DATA).json()
    assert [m["id"] for m in data["messages"]] == [b.pk, a.pk]
    assert data["last_id"] == b.pk
    first = data["messages"][1]
    assert first["event"] == "Payout Created"
    assert first["payload"]["properties"] == {"amount": "1.00"}
    assert first["url"] == f"/admin/django_cdp/message/{a.pk}/change/"
    c = create_message()
    data = admin_client_.get(DATA, {"after": b.pk}).json()
    assert [m["id"] for m in data["messages"]] == [c.pk]
    data = admin_client_.get(DATA, {"after": c.pk}).json()
    assert data == {"messages": [], "last_id": c.pk}


def test_data_filter_by_event_or_user_id(admin_client_):
    create_message(event="Payout Created", user_id="1")
    create_message(event="Shop Updated", user_id="2")
    create_message(event="Shop Updated", user_id="3")
    assert [
        m["user_id"] for m in admin_client_.get(DATA, {"q": "Shop Updated"}).json()["messages"]
    ] == ["3", "2"]
    assert [m["event"] for m in admin_client_.get(DATA, {"q": "1"}).json()["messages"]] == [
        "Payout Created"
    ]


def test_data_is_bounded_and_costs_one_query(admin_client_):
    Message.objects.bulk_create([make_message() for _ in range(cdp_admin.LIVE_LIMIT + 20)])
    admin_client_.get(DATA)  # warm the session
    with CaptureQueriesContext(connection) as queries:
        data = admin_client_.get(DATA, {"after": "junk"}).json()
    assert len(data["messages"]) == cdp_admin.LIVE_LIMIT
    # session + user + the page: no count, no per-row query
    assert len(queries.captured_queries) == 3


def test_data_is_bounded_with_large_payloads(admin_client_):
    notes = 'a "quoted" note\n' * 30_000  # ~500 kB per payload, escaped twice in JSON
    Message.objects.bulk_create(
        [make_message(properties={"notes": notes}) for _ in range(cdp_admin.LIVE_LIMIT + 5)]
    )
    small = create_message(properties={"amount": "1.00"})
    response = admin_client_.get(DATA)
    # Each payload excerpt at most doubles when escaped; the rest of a row is ~300 bytes.
    bound = cdp_admin.LIVE_LIMIT * (2 * cdp_admin.LIVE_PAYLOAD_CHARS + 1_000)
    assert len(response.content) < bound
    first, *large = response.json()["messages"]
    assert first["id"] == small.pk
    assert first["payload"]["properties"] == {"amount": "1.00"}
    assert first["payload_truncated"] is False
    assert first["payload_chars"] == len(small.payload)
    assert len(large) == cdp_admin.LIVE_LIMIT - 1
    stored = dict(Message.objects.values_list("id", "payload"))
    for m in large:
        assert m["payload_truncated"] is True
        assert m["payload_chars"] == len(stored[m["id"]]) > 500_000
        assert m["payload"] == stored[m["id"]][: cdp_admin.LIVE_PAYLOAD_CHARS]


def test_live_permissions(client, nobody_client, viewer_client):
    for url in (LIVE, DATA):
        assert client.get(url)["Location"].startswith("/admin/login/")
        assert nobody_client.get(url).status_code == 403
        assert viewer_client.get(url).status_code == 200


def test_changelist_links_to_live(admin_client_):
    html = admin_client_.get(reverse("admin:django_cdp_message_changelist")).content.decode()
    assert f'href="{LIVE}"' in html
