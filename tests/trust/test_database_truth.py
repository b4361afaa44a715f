"""Every message describes the row as the database holds it, not the Python object saved."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.db import transaction

import django_cdp
from django_cdp.models import Message, TraitsDigest
from example_project.payouts.models import Payout
from example_project.shops.models import Shop
from example_project.tracking_plan import IDENTITY
from tests.testapp.models import Reading
from tests.trust.conftest import Failure, tracking_settings


@pytest.fixture
def tracked(settings, transactional_db):
    """The example's plan plus Reading; the shop's traits are all columns (no computed
    trait), so only the re-identify contract makes a child change read them."""
    settings.DJANGO_CDP = {**tracking_settings(Failure("clean")), "IDENTITY": IDENTITY}


def payloads(**filters) -> list[dict]:
    rows = Message.objects.filter(**filters).order_by("id")
    return [json.loads(m.payload, parse_float=Decimal) for m in rows]


def raw_payloads(**filters) -> list[str]:
    return list(Message.objects.filter(**filters).order_by("id").values_list("payload", flat=True))


def test_a_decimal_is_sent_with_its_fields_decimal_places(tracked, shop_with_plan):
    Reading.objects.create(shop=shop_with_plan, ratio="49.9")
    (text,) = raw_payloads(event="Reading Created")
    assert '"ratio":49.90' in text  # the exact JSON number the database holds


def test_zero_and_its_reloaded_value_are_sent_alike(tracked, shop_with_plan):
    reading = Reading.objects.create(shop=shop_with_plan, ratio=Decimal("0"))
    reading.refresh_from_db()
    reading.ratio = Decimal("0.000")
    reading.save()  # the same value: no Updated
    (text,) = raw_payloads(event="Reading Created")
    assert '"ratio":0.00' in text
    assert not Message.objects.filter(event="Reading Updated").exists()


def test_an_int_assigned_to_a_char_field_is_sent_as_the_string_the_row_holds(
    tracked, shop_with_plan
):
    Reading.objects.create(shop=shop_with_plan, label=42)
    (message,) = payloads(event="Reading Created")
    assert message["properties"]["label"] == "42"


def test_update_fields_sends_the_other_fields_as_the_database_holds_them(tracked, shop_with_plan):
    reading = Reading.objects.create(shop=shop_with_plan, score=1.0, ratio=Decimal("1.00"))
    reading.score = 2.0
    reading.ratio = Decimal("9.99")  # changed on the instance, never saved
    reading.save(update_fields=["score"])
    (message,) = payloads(event="Reading Updated")
    assert message["properties"]["score"] == 2.0
    assert message["properties"]["ratio"] == Decimal("1.00")
    assert message["properties"]["changed_fields"] == ["score"]


def test_update_fields_in_one_transaction_keeps_the_database_values(tracked, shop_with_plan):
    reading = Reading.objects.create(shop=shop_with_plan, score=1.0, ratio=Decimal("1.00"))
    with transaction.atomic():
        reading.score = 2.0
        reading.save()
        reading.ratio = Decimal("7.00")  # not saved
        reading.score = 3.0
        reading.save(update_fields=["score"])
    (message,) = payloads(event="Reading Updated")
    assert message["properties"]["score"] == 3.0
    assert message["properties"]["ratio"] == Decimal("1.00")


def test_a_too_large_message_that_shrinks_in_its_transaction_becomes_pending(
    tracked, shop_with_plan, settings
):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "MAX_MESSAGE_BYTES": 400}
    with transaction.atomic():
        reading = Reading.objects.create(shop=shop_with_plan, label="x" * 50, ratio=1)
        assert Message.objects.get(event="Reading Created").status == Message.Status.FAILED
        reading.label = "short"
        reading.save()
    row = Message.objects.get(event="Reading Created")
    assert row.status == Message.Status.PENDING
    assert row.last_error == ""
    assert row.data["properties"]["label"] == "short"


def test_a_message_that_fails_then_builds_in_its_transaction_becomes_pending(
    tracked, shop_with_plan
):
    with transaction.atomic():
        reading = Reading.objects.create(shop=shop_with_plan, score=float("inf"))
        assert Message.objects.get(event="Reading Created").status == Message.Status.FAILED
        reading.score = 1.5
        reading.save()
    row = Message.objects.get(event="Reading Created")
    assert (row.status, row.data["properties"]["score"]) == (Message.Status.PENDING, 1.5)


# --- re-identify as the contract says ---------------------------------------------------------


def test_an_owner_created_before_tracking_is_identified_at_its_first_change(
    tracked, shop_with_plan
):
    TraitsDigest.objects.all().delete()
    Message.objects.all().delete()
    Payout.objects.create(shop=shop_with_plan, amount=Decimal("1.00"), currency="EUR")
    (identify,) = payloads(type="identify")
    assert identify["userId"] == str(shop_with_plan.pk)
    assert identify["traits"]["domain"] == "acme.example"


def test_an_owner_made_by_bulk_create_is_identified_at_its_childs_first_change(
    tracked, shop_with_plan
):
    (shop,) = Shop.objects.bulk_create([Shop(domain="bulk.example", email="b@bulk.example")])
    assert not Message.objects.filter(user_id=str(shop.pk)).exists()
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert [m["userId"] for m in payloads(type="identify", user_id=str(shop.pk))] == [str(shop.pk)]


def test_traits_changed_behind_the_orm_reach_the_data_plane_at_the_next_change(
    tracked, shop_with_plan
):
    Message.objects.all().delete()
    Shop.objects.filter(pk=shop_with_plan.pk).update(email="crm@acme.example")
    with transaction.atomic():
        Payout.objects.create(shop=shop_with_plan, amount=Decimal("1.00"), currency="EUR")
        Payout.objects.create(shop=shop_with_plan, amount=Decimal("2.00"), currency="EUR")
    (identify,) = payloads(type="identify")  # once per transaction
    assert identify["traits"]["email"] == "crm@acme.example"


def test_unchanged_traits_are_not_identified_again(tracked, shop_with_plan):
    Message.objects.all().delete()
    Payout.objects.create(shop=shop_with_plan, amount=Decimal("1.00"), currency="EUR")
    assert payloads(type="identify") == []


def test_a_failed_identify_is_not_recorded_as_sent_traits(settings, shop_with_plan, monkeypatch):
    monkeypatch.setattr(Shop, "health", property(lambda shop: float("inf")), raising=False)
    settings.DJANGO_CDP = tracking_settings(Failure("clean"))  # with the computed trait
    Shop.objects.filter(pk=shop_with_plan.pk).update(email="crm@acme.example")
    django_cdp.identify(shop_with_plan)
    failed = Message.objects.get(type="identify", status="failed")
    assert TraitsDigest.objects.get(user_id=str(shop_with_plan.pk)).message_id != (
        failed.message_id
    )


def test_a_message_created_receiver_that_raises_never_reaches_the_save(
    tracked, shop_with_plan, caplog
):
    from django_cdp.signals import message_created

    def broken(sender, message, **kwargs):
        raise RuntimeError("receiver failed")

    message_created.connect(broken, weak=False)
    try:
        with transaction.atomic():
            reading = Reading.objects.create(shop=shop_with_plan)
            assert Shop.objects.exists()
    finally:
        message_created.disconnect(broken)
    assert Reading.objects.filter(pk=reading.pk).exists()
    assert Message.objects.filter(event="Reading Created", status="pending").exists()
    assert "receiver failed" in caplog.text
