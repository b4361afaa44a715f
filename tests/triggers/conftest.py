"""Fixtures of the trigger engine's own tests (PostgreSQL only)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from django_cdp.capture import deferred
from django_cdp.models import Message
from example_project.shops.models import Plan, Shop

pytestmark = pytest.mark.postgres


@pytest.fixture
def triggers(transactional_db, settings) -> None:
    """The example plan captured by triggers (installed by the settings change)."""
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "CAPTURE": "triggers"}


@pytest.fixture
def shop(triggers) -> Shop:
    plan = Plan.objects.create(name="Growth", monthly_price=Decimal("49.00"))
    shop = Shop.objects.create(domain="acme.example", email="owner@acme.example", plan=plan)
    clear()
    return shop


def clear() -> None:
    """Empty the outbox: its messages, and the statements not expanded into messages yet."""
    deferred.expand()
    Message.objects.all().delete()


def messages(*, expand: bool = True, **filters) -> list[dict]:
    """The outbox's messages (with ``expand``: the deferred statements expanded first, as
    delivery does)."""
    if expand:
        deferred.expand()
    rows = Message.objects.filter(**filters).order_by("id")
    return [json.loads(m.payload, parse_float=Decimal) for m in rows]


def events(*, expand: bool = True) -> list[str]:
    return [m["event"] for m in messages(type="track", expand=expand)]
