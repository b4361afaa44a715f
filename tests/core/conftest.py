"""Fixtures for the tracking-core tests: read back what the outbox holds."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from django_cdp.models import Message
from example_project.shops.models import Plan, Shop


class Outbox:
    """The messages in the outbox, oldest first, parsed."""

    def __init__(self, using: str = "default") -> None:
        self.using = using

    def rows(self) -> list[Message]:
        return list(Message.objects.using(self.using).order_by("id"))

    def all(self) -> list[dict]:
        return [json.loads(m.payload, parse_float=Decimal) for m in self.rows()]

    def tracks(self) -> list[dict]:
        return [m for m in self.all() if m["type"] == "track"]

    def identifies(self) -> list[dict]:
        return [m for m in self.all() if m["type"] == "identify"]

    def events(self) -> list[str]:
        return [m["event"] for m in self.tracks()]

    def clear(self) -> None:
        Message.objects.using(self.using).all().delete()


@pytest.fixture
def outbox(transactional_db) -> Outbox:
    return Outbox()


@pytest.fixture
def plan(transactional_db) -> Plan:
    return Plan.objects.create(name="Growth", monthly_price=Decimal("49.00"))


@pytest.fixture
def shop(transactional_db, plan, outbox) -> Shop:
    """A shop whose creation messages have been cleared (its digest stays)."""
    shop = Shop.objects.create(domain="acme.example", email="owner@acme.example", plan=plan)
    outbox.clear()
    return shop
