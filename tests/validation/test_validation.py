"""Tracking-plan validation when a message is written: flag, raise, block and off."""

from __future__ import annotations

import copy
import logging
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import transaction
from django.test import override_settings

import django_cdp
from django_cdp import validation
from django_cdp.models import Message
from django_cdp.validation import TrackingPlanViolation, violations_of
from example_project.payouts.models import Payout
from example_project.shops.models import Shop

EVENTS = {
    "Customer Charged": {
        "description": "A shop's customer was charged.",
        "properties": {
            "amount": {"type": "number", "required": True},
            "currency": {"type": "string", "required": True},
            "coupon": {"type": "string"},
        },
    }
}
HOOKS = "tests.validation.hooks."


def cdp(**overrides):
    config = copy.deepcopy(settings.DJANGO_CDP)
    config["EVENTS"] = EVENTS
    config.update(overrides)
    return override_settings(DJANGO_CDP=config)


def kinds(row: Message) -> list[str]:
    return [v["type"] for v in row.violations]


# --- the violation names -----------------------------------------------------------------------


def test_conforming_automatic_messages_have_no_violations(outbox, plan):
    with cdp():
        shop = Shop.objects.create(domain="acme.example", email="a@acme.example", plan=plan)
        payout = Payout.objects.create(shop=shop, amount=Decimal("12.50"), currency="EUR")
        payout.status = Payout.Status.PAID
        payout.save()
        payout.delete()
        shop.plan = None
        shop.save()
    rows = outbox.rows()
    assert [r.event or r.type for r in rows] == [
        "Shop Created",
        "identify",
        "Payout Created",
        "Payout Updated",
        "Payout Deleted",
        "identify",
    ]
    assert all(r.violations == [] and r.status == "pending" for r in rows)


def test_unplanned_event(shop):
    with cdp():
        row = django_cdp.track(shop, "Customer Chargd", {"amount": 1, "currency": "EUR"})
    assert row.violations == [
        {
            "type": "Unplanned-Event",
            "property": "",
            "message": "event 'Customer Chargd' is not in the tracking plan",
            "meta": {"instancePath": "/event", "schemaPath": "#"},
        }
    ]


def test_required_missing(shop):
    with cdp():
        row = django_cdp.track(shop, "Customer Charged", {"coupon": "X"})
    assert kinds(row) == ["Required-Missing", "Required-Missing"]
    assert [v["property"] for v in row.violations] == ["amount", "currency"]
    assert row.violations[0]["meta"]["instancePath"] == "/properties"


def test_datatype_mismatch(shop):
    with cdp():
        row = django_cdp.track(shop, "Customer Charged", {"amount": "12.50", "currency": "EUR"})
    (violation,) = row.violations
    assert violation["type"] == "Datatype-Mismatch"
    assert violation["property"] == "amount"
    assert violation["meta"] == {
        "instancePath": "/properties/amount",
        "schemaPath": "#/properties/properties/properties/amount/type",
    }
    assert "'12.50' is not of type 'number'" in violation["message"]


def test_additional_properties(shop):
    with cdp():
        row = django_cdp.track(
            shop, "Customer Charged", {"amount": 1, "currency": "EUR", "card": "4242", "ip": "x"}
        )
    assert kinds(row) == ["Additional-Properties", "Additional-Properties"]
    assert [v["property"] for v in row.violations] == ["card", "ip"]
    assert row.violations[0]["meta"]["instancePath"] == "/properties/card"


def test_decimals_and_formats_are_checked(shop):
    with cdp():
        assert (
            violations_of(
                {
                    "type": "track",
                    "event": "Customer Charged",
                    "properties": {"amount": Decimal("1.10"), "currency": "EUR"},
                }
            )
            == []
        )
        (bad,) = violations_of(
            {
                "type": "track",
                "event": "Payout Updated",
                "properties": {
                    "id": 1,
                    "amount": 1,
                    "currency": "EUR",
                    "status": "paid",
                    "changed_fields": ["status", 3],
                },
            }
        )
    assert bad["type"] == "Datatype-Mismatch"
    assert bad["meta"]["instancePath"] == "/properties/changed_fields/1"


def test_identify_traits_are_validated_against_the_identify_schema(outbox, plan):
    with cdp(ENRICH_MESSAGE=HOOKS + "nickname_trait"):
        Shop.objects.create(domain="acme.example", email="a@acme.example", plan=plan)
    (identify,) = [r for r in outbox.rows() if r.type == "identify"]
    assert kinds(identify) == ["Additional-Properties"]
    assert identify.violations[0]["meta"]["instancePath"] == "/traits/nickname"


# --- modes -------------------------------------------------------------------------------------


def test_flag_stores_sends_records_and_logs(shop, caplog):
    with cdp(VALIDATION="flag"), caplog.at_level(logging.WARNING, logger="django_cdp"):
        row = django_cdp.track(shop, "Customer Chargd")
    row.refresh_from_db()
    assert row.status == Message.Status.PENDING
    assert kinds(row) == ["Unplanned-Event"]
    assert "violates the tracking plan: Unplanned-Event" in caplog.text
    assert Message.objects.filter(violations=[]).count() == 0  # the filter the admin uses


def test_flag_is_the_default(shop):
    row = django_cdp.track(shop, "Something Undeclared")
    assert (row.status, kinds(row)) == ("pending", ["Unplanned-Event"])


def test_raise_raises_where_a_manual_event_is_emitted_and_stores_nothing(outbox, shop):
    with cdp(VALIDATION="raise"), pytest.raises(TrackingPlanViolation) as info:
        django_cdp.track(shop, "Customer Charged", {"amount": "12.50", "currency": "EUR"})
    assert "Datatype-Mismatch" in str(info.value)
    assert [v["type"] for v in info.value.violations] == ["Datatype-Mismatch"]
    assert outbox.rows() == []


def test_raise_propagates_from_an_automatic_event_through_save(outbox, shop):
    with (
        cdp(VALIDATION="raise", ENRICH_MESSAGE=HOOKS + "big_payouts_get_a_flag"),
        pytest.raises(TrackingPlanViolation, match="Additional-Properties"),
        transaction.atomic(),
    ):
        Payout.objects.create(shop=shop, amount=Decimal("5000"), currency="EUR")
    assert outbox.rows() == []
    assert Payout.objects.count() == 0  # the atomic block rolled back with the exception


def test_raise_lets_conforming_messages_through(outbox, shop):
    with cdp(VALIDATION="raise"):
        Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
        django_cdp.track(shop, "Customer Charged", {"amount": 5, "currency": "EUR"})
    assert outbox.events() == ["Payout Created", "Customer Charged"]


def test_block_stores_but_never_sends(shop):
    from django_cdp import delivery

    with cdp(VALIDATION="block"):
        row = django_cdp.track(shop, "Customer Charged", {"amount": 1})
        good = django_cdp.track(shop, "Customer Charged", {"amount": 1, "currency": "EUR"})
    row.refresh_from_db()
    assert row.status == Message.Status.BLOCKED
    assert kinds(row) == ["Required-Missing"]
    assert row.last_error == (
        "blocked by the tracking plan: Required-Missing: 'currency' is a required property"
    )
    batch = delivery.claim("default", "t", max_messages=100, max_bytes=10**6, lease_seconds=60)
    assert [c.id for c in batch.rows] == [good.pk]


def test_block_keeps_the_identify_digest_unwritten_so_traits_are_sent_again(outbox, plan):
    from django_cdp.models import TraitsDigest

    with cdp(VALIDATION="block", ENRICH_MESSAGE=HOOKS + "nickname_trait"):
        Shop.objects.create(domain="acme.example", email="a@acme.example", plan=plan)
    (identify,) = [r for r in outbox.rows() if r.type == "identify"]
    assert identify.status == Message.Status.BLOCKED
    assert TraitsDigest.objects.count() == 0


def test_off_validates_nothing(shop):
    with cdp(VALIDATION="off"):
        row = django_cdp.track(shop, "Anything", {"x": object.__name__})
    assert row.violations == []


# --- coalescing: the final payload decides -----------------------------------------------------


def test_a_rewritten_payload_is_validated_again(outbox, shop):
    with cdp(VALIDATION="block", ENRICH_MESSAGE=HOOKS + "big_payouts_get_a_flag"):
        with transaction.atomic():
            payout = Payout.objects.create(shop=shop, amount=Decimal("10"), currency="EUR")
            payout.amount = Decimal("5000")
            payout.save()
        (row,) = outbox.rows()
        assert (row.event, row.status, kinds(row)) == (
            "Payout Created",
            "blocked",
            ["Additional-Properties"],
        )
        outbox.clear()
        with transaction.atomic():
            payout = Payout.objects.create(shop=shop, amount=Decimal("5000"), currency="EUR")
            payout.amount = Decimal("10")
            payout.save()
        (row,) = outbox.rows()
        assert (row.status, row.violations, row.last_error) == ("pending", [], "")


def test_flag_mode_rewrite_clears_violations(outbox, shop):
    with cdp(ENRICH_MESSAGE=HOOKS + "big_payouts_get_a_flag"), transaction.atomic():
        payout = Payout.objects.create(shop=shop, amount=Decimal("5000"), currency="EUR")
        assert kinds(outbox.rows()[0]) == ["Additional-Properties"]
        payout.amount = Decimal("10")
        payout.save()
    (row,) = outbox.rows()
    assert (row.status, row.violations) == ("pending", [])


# --- compiled once -----------------------------------------------------------------------------


def test_validators_are_compiled_once_per_registry_load(shop, monkeypatch):
    calls = []
    real = validation._compile
    monkeypatch.setattr(validation, "_compile", lambda *a: calls.append(a) or real(*a))
    with cdp():
        for _ in range(5):
            django_cdp.track(shop, "Customer Charged", {"amount": 1, "currency": "EUR"})
        compiled = len(calls)
        assert compiled == 1 + 12 + 1  # identify, the automatic events, Customer Charged
    with cdp(EVENTS={}):
        django_cdp.track(shop, "Customer Charged", {"amount": 1, "currency": "EUR"})
    assert len(calls) == compiled + 13
