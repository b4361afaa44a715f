"""Fixtures for the admin tests: users with and without the Message permissions, and rows."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from django_cdp.models import Message


def make_message(**overrides: Any) -> Message:
    """A message row as delivery would have left it (not saved)."""
    message_id = overrides.pop("message_id", None) or str(uuid.uuid4())
    user_id = overrides.pop("user_id", "42")
    event = overrides.pop("event", "Payout Created")
    mtype = overrides.pop("type", Message.Type.TRACK)
    created_at: datetime = overrides.pop("created_at", None) or timezone.now()
    if mtype == Message.Type.TRACK:
        data = {"type": "track", "event": event, "userId": user_id, "messageId": message_id}
        data["properties"] = overrides.pop("properties", {"amount": "12.50", "currency": "EUR"})
    else:
        event = ""
        data = {"type": "identify", "userId": user_id, "messageId": message_id}
        data["traits"] = overrides.pop("traits", {"email": "owner@acme.example"})
    data["timestamp"] = created_at.isoformat()
    fields = {
        "message_id": message_id,
        "type": mtype,
        "event": event,
        "user_id": user_id,
        "payload": json.dumps(data, separators=(",", ":")),
        "created_at": created_at,
        "source_model": "payouts.payout",
        "source_pk": "7",
    }
    fields.update(overrides)
    return Message(**fields)


def create_message(**overrides: Any) -> Message:
    message = make_message(**overrides)
    message.save()
    return message


def _staff(username: str, *perms: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    if perms:
        user.user_permissions.set(
            Permission.objects.filter(content_type__app_label="django_cdp", codename__in=perms)
        )
    return user


@pytest.fixture
def superuser(db) -> User:
    return User.objects.create_superuser("root", password="pw")


@pytest.fixture
def admin_client_(superuser) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


@pytest.fixture
def viewer_client(db) -> Client:
    """Staff with view_message only."""
    client = Client()
    client.force_login(_staff("viewer", "view_message"))
    return client


@pytest.fixture
def operator_client(db) -> Client:
    """Staff with view_message and change_message (may requeue)."""
    client = Client()
    client.force_login(_staff("operator", "view_message", "change_message"))
    return client


@pytest.fixture
def nobody_client(db) -> Client:
    """Staff without any django_cdp permission."""
    client = Client()
    client.force_login(_staff("nobody"))
    return client
