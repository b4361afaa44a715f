"""The dictionary page in the admin: each event's 7-day count and last seen; the flagged filter."""

from __future__ import annotations

import re
from datetime import timedelta

from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

import django_cdp
from django_cdp.models import Message
from example_project.payouts.models import Payout


def client_for(*perms: str) -> Client:
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="django_cdp", codename__in=perms)
    )
    client = Client()
    client.force_login(user)
    return client


def row(html: str, event: str) -> str:
    match = re.search(
        rf'<tr class="cdp-event" data-event="{re.escape(event)}">(.*?)</tr>', html, re.S
    )
    assert match, event
    return match.group(1)


def cell(html: str, name: str) -> str:
    return re.search(rf'<td class="{name}">(.*?)</td>', html, re.S).group(1)


def test_every_event_with_its_7_day_count_and_last_seen(outbox, shop):
    for _ in range(3):
        Payout.objects.create(shop=shop, amount=1, currency="EUR")
    first = Message.objects.filter(event="Payout Created").order_by("id").first()
    Message.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(days=10))
    month_ago = timezone.now() - timedelta(days=30)
    Message.objects.create(
        message_id="old", type="track", event="Payout Updated", payload="{}", created_at=month_ago
    )
    django_cdp.track(shop, "Not In The Plan")

    html = client_for("view_message").get("/admin/django_cdp/message/dictionary/").content.decode()

    created = row(html, "Payout Created")
    assert cell(created, "count") == "2"  # the third is older than 7 days
    latest = Message.objects.filter(event="Payout Created").latest("created_at").created_at
    assert cell(created, "last-seen") == timezone.localtime(latest).strftime("%Y-%m-%d %H:%M")
    assert "<code>amount</code>: number" in created
    updated = row(html, "Payout Updated")
    assert cell(updated, "count") == "0"
    assert cell(updated, "last-seen") == timezone.localtime(month_ago).strftime("%Y-%m-%d %H:%M")
    assert cell(row(html, "Shop Deleted"), "last-seen") == "never"
    assert "<code>plan</code>: string | null" in row(html, "Identify")
    unplanned = re.search(r'data-event="Not In The Plan"><th>.*?</th><td class="count">(\d+)', html)
    assert unplanned.group(1) == "1"


def test_the_flagged_column_counts_violations(outbox, shop):
    Payout.objects.create(shop=shop, amount=1, currency="EUR")
    django_cdp.track(shop, "Shop Deleted", {"id": "not an integer"})
    html = client_for("view_message").get("/admin/django_cdp/message/dictionary/").content.decode()
    assert cell(row(html, "Payout Created"), "flagged") == "0"
    assert cell(row(html, "Shop Deleted"), "flagged") == "1"


def test_permissions(db):
    assert (
        Client().get("/admin/django_cdp/message/dictionary/").status_code == 302
    )  # to the login page
    assert client_for().get("/admin/django_cdp/message/dictionary/").status_code == 403


def test_inside_message_admin_with_the_flagged_filter(outbox, shop):
    good = Payout.objects.create(shop=shop, amount=1, currency="EUR")
    bad = django_cdp.track(shop, "Customer Chargd")
    client = client_for("view_message")
    assert client.get("/admin/django_cdp/message/dictionary/").status_code == 200
    flagged = client.get("/admin/django_cdp/message/?flagged=yes").context["cl"].result_list
    assert [m.pk for m in flagged] == [bad.pk]
    conforming = client.get("/admin/django_cdp/message/?flagged=no").context["cl"].result_list
    assert bad.pk not in [m.pk for m in conforming]
    assert good.pk  # its Created row conforms
    assert Message.objects.filter(event="Payout Created").exclude(violations=[]).count() == 0
