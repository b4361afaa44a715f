"""AnalyticsEventsMixin: the "Analytics events" section on a tracked model's change page."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from django_cdp.models import Message
from example_project.payouts.models import Payout
from example_project.shops.models import Plan, Shop

pytestmark = pytest.mark.urls("tests.admin.urls_mixin")


@pytest.fixture
def payout(db) -> Payout:
    plan = Plan.objects.create(name="Growth", monthly_price=Decimal("49.00"))
    shop = Shop.objects.create(domain="acme.example", email="o@acme.example", plan=plan)
    Payout.objects.create(shop=shop, amount=Decimal("99.00"), currency="USD")  # not listed
    return Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")


def _page(client: Client, payout: Payout) -> str:
    response = client.get(f"/admin/payouts/payout/{payout.pk}/change/")
    assert response.status_code == 200
    return response.content.decode()


def test_section_lists_the_objects_messages(admin_client_, payout):
    events = list(
        Message.objects.filter(source_model="payouts.payout", source_pk=str(payout.pk))
        .order_by("-id")
        .values_list("event", flat=True)
    )
    assert events == ["Payout Created"]
    html = _page(admin_client_, payout)
    section = html.split('id="cdp-object-events"')[1]
    assert section.count("Payout Created") == 1
    assert f"?source_model=payouts.payout&amp;source_pk={payout.pk}" in section


def test_filtered_log_link_works(admin_client_, payout):
    response = admin_client_.get(
        "/admin/django_cdp/message/", {"source_model": "payouts.payout", "source_pk": payout.pk}
    )
    assert response.status_code == 200
    rows = response.context["cl"].result_list
    assert [(m.event, m.source_pk) for m in rows] == [("Payout Created", str(payout.pk))]


def test_hidden_without_view_message(payout):
    user = User.objects.create_user("payouts-only", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="payouts", codename="view_payout")
    )
    client = Client()
    client.force_login(user)
    assert "cdp-object-events" not in _page(client, payout)


def test_shown_to_the_users_the_delivery_log_lets_in(payout):
    user = User.objects.create_user("payouts-operator", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="payouts", codename="view_payout")
        | Permission.objects.filter(content_type__app_label="django_cdp", codename="change_message")
    )
    client = Client()
    client.force_login(user)
    assert "cdp-object-events" in _page(client, payout)
