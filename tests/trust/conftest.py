"""The trust suite: a failure in django-cdp's code never costs the user a write.

Each failure point is something that goes wrong while a message is built; each
path is a way the user's code writes. ``failure`` sets one failure point up and
says what the failed row's reason must contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from django_cdp.models import Message
from example_project.shops.models import Plan, Shop
from example_project.tracking_plan import IDENTITY, MODELS

READING = {
    "owner": "shop",
    "properties": {
        "score": "score",
        "ratio": "ratio",
        "label": "label",
        "checked": "checked_label",
    },
}
#: The shop's identify gains a computed trait: the failure points of identify paths.
HEALTH_TRAITS = {**IDENTITY["traits"], "health": "health"}


@dataclass
class Failure:
    name: str
    #: Reading column values that make the message fail to build.
    values: dict[str, Any] = field(default_factory=dict)
    #: What the trait ``health`` returns (or raises) on identify paths.
    health: Any = "fine"
    #: Text the failed row's ``last_error`` contains.
    reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)


def _raise_health(shop: Shop) -> str:
    raise ValueError("the health check is down")


FAILURES = {
    "unconvertible": Failure(
        "unconvertible",
        values={"score": float("inf")},
        health=float("inf"),
        reason="inf is not a JSON number",
    ),
    "binary": Failure(
        "binary",
        values={"blob": b"\x00\x01"},
        health=b"\x00\x01",
        reason="is not JSON-serialisable",
        properties={"blob": "blob"},
    ),
    "raising property": Failure(
        "raising property",
        values={"label": "raise"},
        health=_raise_health,
        reason="raised ValueError: ",
    ),
    "raising hook": Failure(
        "raising hook",
        reason="RuntimeError: enrichment failed",
        settings={"ENRICH_MESSAGE": "tests.core.hooks.broken"},
    ),
    "hook adds nan": Failure(
        "hook adds nan",
        reason="not JSON after ENRICH_MESSAGE: Out of range float values",
        settings={"ENRICH_MESSAGE": "tests.trust.hooks.add_nan"},
    ),
    "raising validation": Failure("raising validation", reason="RuntimeError: validator crashed"),
    "owner error": Failure("owner error", reason="owner: RuntimeError: owner lookup crashed"),
    "too large": Failure("too large", reason="too large (", settings={"MAX_MESSAGE_BYTES": 200}),
}


def tracking_settings(failure: Failure) -> dict[str, Any]:
    from django.conf import settings

    reading = {**READING, "properties": {**READING["properties"], **failure.properties}}
    return {
        **settings.DJANGO_CDP,
        "IDENTITY": {**IDENTITY, "traits": HEALTH_TRAITS},
        "MODELS": {**MODELS, "testapp.Reading": reading},
        **failure.settings,
    }


@pytest.fixture(params=list(FAILURES), ids=list(FAILURES))
def failure(request, settings, monkeypatch, transactional_db) -> Failure:
    """One failure point, set up: the settings, and the fault it injects."""
    failure = FAILURES[request.param]
    monkeypatch.setattr(Shop, "health", property(lambda shop: "fine"), raising=False)
    settings.DJANGO_CDP = tracking_settings(Failure("clean"))
    healthy_shop = _shop()  # created while every build still succeeds
    health = failure.health
    if callable(health):
        monkeypatch.setattr(Shop, "health", property(health))
    else:
        monkeypatch.setattr(Shop, "health", property(lambda shop: health))
    if failure.name == "raising validation":
        from django_cdp import validation

        def crash(message):
            raise RuntimeError("validator crashed")

        monkeypatch.setattr(validation, "violations_of", crash)
    if failure.name == "owner error":
        from django_cdp.capture import owners

        def crash(*args, **kwargs):
            raise RuntimeError("owner lookup crashed")

        monkeypatch.setattr(owners, "resolve_owner", crash)
    settings.DJANGO_CDP = tracking_settings(failure)
    failure.shop = healthy_shop  # type: ignore[attr-defined]
    Message.objects.all().delete()
    return failure


@pytest.fixture
def shop_with_plan(transactional_db) -> Shop:
    return _shop()


def _shop() -> Shop:
    plan = Plan.objects.create(name="Growth", monthly_price=Decimal("49.00"))
    return Shop.objects.create(domain="acme.example", email="owner@acme.example", plan=plan)


def failed_rows(reason: str) -> list[Message]:
    return [
        m for m in Message.objects.filter(status=Message.Status.FAILED) if reason in m.last_error
    ]
