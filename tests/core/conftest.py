"""Fixtures for the tracking-core tests: read back what the outbox holds."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from django_cdp.capture import deferred
from django_cdp.models import Message
from example_project.shops.models import Plan, Shop
from tests.conftest import DATABASE


class Outbox:
    """The messages in the outbox, parsed, in the order delivery sends them (a deferred
    statement's messages are due from when it ran, though written later)."""

    def __init__(self, using: str = "default") -> None:
        self.using = using

    def rows(self) -> list[Message]:
        deferred.expand(self.using)  # what delivery does first
        return list(Message.objects.using(self.using).order_by("next_attempt_at", "id"))

    def all(self) -> list[dict]:
        return [json.loads(m.payload, parse_float=Decimal) for m in self.rows()]

    def tracks(self) -> list[dict]:
        return [m for m in self.all() if m["type"] == "track"]

    def identifies(self) -> list[dict]:
        return [m for m in self.all() if m["type"] == "identify"]

    def events(self) -> list[str]:
        return [m["event"] for m in self.tracks()]

    def clear(self) -> None:
        deferred.expand(self.using)
        Message.objects.using(self.using).all().delete()


#: The capture engines the core's behaviour tests run under: both on PostgreSQL, where the
#: trigger engine must write the messages the signal engine writes, whether it defers
#: statements ("triggers", as configured by default: every statement of a deferrable model
#: stored whole and expanded into messages when the outbox is read, as delivery does before
#: claiming) or writes every message in its statement ("immediate").
ENGINES = ["signals", "triggers", "immediate"] if DATABASE == "postgres" else ["signals"]


def use_engine(settings, name: str) -> str:
    """Capture with the engine ``name`` (one of :data:`ENGINES`; triggers get installed)."""
    capture = "signals" if name == "signals" else "triggers"
    defer = {"DEFER_STATEMENT_ROWS": None} if name == "immediate" else {}
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "CAPTURE": capture, **defer}
    return name


@pytest.fixture(params=ENGINES)
def engine(request, transactional_db, settings) -> str:
    """The capture engine of this run of the test (its triggers installed for it)."""
    return use_engine(settings, request.param)


@pytest.fixture
def outbox(engine) -> Outbox:
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
