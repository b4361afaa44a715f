"""One rule decides who sees messages, on every page that shows them (``can_view_messages``)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from django_cdp.admin_permissions import can_view_messages
from tests.admin.conftest import create_message

PAGES = {
    "delivery log": lambda m: reverse("admin:django_cdp_message_changelist"),
    "message": lambda m: reverse("admin:django_cdp_message_change", args=[m.pk]),
    "live events": lambda m: reverse("admin:django_cdp_message_live"),
    "live events data": lambda m: reverse("admin:django_cdp_message_live_data"),
    "health": lambda m: reverse("admin:django_cdp_message_health"),
    "dictionary": lambda m: reverse("admin:django_cdp_dictionary"),
}


def staff(*codenames: str) -> User:
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="django_cdp", codename__in=codenames)
    )
    return user


@pytest.mark.parametrize(
    ("codenames", "allowed"),
    [
        ((), False),
        (("delete_message",), False),
        (("view_message",), True),
        (("change_message",), True),  # change implies view, as everywhere in Django's admin
    ],
)
@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_page_follows_the_one_rule(db, page, codenames, allowed):
    user = staff(*codenames)
    assert can_view_messages(user) is allowed
    client = Client()
    client.force_login(user)
    response = client.get(PAGES[page](create_message()))
    assert response.status_code == (200 if allowed else 403)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_page_sends_anonymous_users_to_the_login(db, page):
    response = Client().get(PAGES[page](create_message()))
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
