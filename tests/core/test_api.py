"""The public calls: track(), identify(), the bulk helpers, and their transactions."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import transaction

import django_cdp
from django_cdp.models import Message
from example_project.payouts.models import Payout
from example_project.shops.models import Plan, Shop


def test_track_records_a_manual_event_for_the_owner(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    row = django_cdp.track(payout, "Customer Charged", {"amount": Decimal("10.00"), "ok": True})
    assert isinstance(row, Message)
    (track,) = outbox.tracks()
    assert track["event"] == "Customer Charged"
    assert track["userId"] == str(shop.pk)
    assert track["properties"] == {"amount": Decimal("10.00"), "ok": True}


def test_track_on_the_owner_itself(outbox, shop):
    django_cdp.track(shop, "Trial Extended")
    assert outbox.tracks()[0]["userId"] == str(shop.pk)


def test_track_rejects_an_unregistered_model(outbox, plan):
    with pytest.raises(TypeError, match="not an instance of the identity model"):
        django_cdp.track(plan, "Plan Viewed")


def test_track_names_the_property_it_cannot_convert(outbox, shop):
    from django_cdp.payloads import PayloadError

    with pytest.raises(PayloadError, match=r"^when: "):
        django_cdp.track(shop, "Odd", {"when": object()})
    assert outbox.rows() == []


def test_track_in_a_rolled_back_transaction_leaves_nothing(outbox, shop):
    with pytest.raises(RuntimeError), transaction.atomic():
        django_cdp.track(shop, "Trial Extended")
        raise RuntimeError
    assert outbox.rows() == []


def test_identify_is_skipped_when_unchanged_and_forced_on_request(outbox, shop):
    django_cdp.identify(shop)
    assert outbox.identifies() == []
    django_cdp.identify(shop, force=True)
    (identify,) = outbox.identifies()
    assert identify["traits"]["domain"] == "acme.example"


def test_identify_from_a_registered_child_identifies_its_owner(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    outbox.clear()
    django_cdp.identify(payout, force=True)
    assert outbox.identifies()[0]["userId"] == str(shop.pk)


def test_identify_picks_up_changes_made_behind_the_orm(outbox, shop):
    Shop.objects.filter(pk=shop.pk).update(email="direct@acme.example")
    django_cdp.identify(shop)
    assert outbox.identifies()[0]["traits"]["email"] == "direct@acme.example"


def test_calls_do_nothing_while_tracking_is_disabled(outbox, shop):
    with django_cdp.tracking_disabled():
        assert django_cdp.track(shop, "Ignored") is None
        django_cdp.identify(shop, force=True)
    assert outbox.rows() == []


# --- bulk helpers ------------------------------------------------------------------------------


def test_bulk_create_records_created_per_row_and_one_identify_per_owner(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND_UNCHANGED_IDENTIFY": True}
    created = django_cdp.bulk_create(
        [Payout(shop=shop, amount=Decimal(i), currency="EUR") for i in range(3)]
    )
    assert len(created) == 3
    assert outbox.events() == ["Payout Created"] * 3
    assert [t["properties"]["id"] for t in outbox.tracks()] == [p.pk for p in created]
    assert len(outbox.identifies()) == 1


def test_bulk_update_records_only_rows_that_changed(outbox, shop):
    payouts = [
        Payout.objects.create(shop=shop, amount=Decimal(i), currency="EUR") for i in range(3)
    ]
    outbox.clear()
    payouts[0].currency = "USD"
    payouts[1].currency = "EUR"  # unchanged
    payouts[2].currency = "GBP"
    django_cdp.bulk_update(payouts, ["currency"])
    tracks = outbox.tracks()
    # One statement: the trigger engine writes its rows' messages as a set.
    assert sorted(t["properties"]["id"] for t in tracks) == [payouts[0].pk, payouts[2].pk]
    assert all(t["properties"]["changed_fields"] == ["currency"] for t in tracks)


def test_queryset_update_tracks_expression_results(outbox, shop):
    from django.db.models import F

    a = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    Payout.objects.create(shop=shop, amount=Decimal("2.00"), currency="USD")
    outbox.clear()
    count = django_cdp.queryset_update(
        Payout.objects.filter(currency="EUR"), amount=F("amount") + 1
    )
    assert count == 1
    (track,) = outbox.tracks()
    assert track["properties"]["id"] == a.pk
    assert track["properties"]["amount"] == Decimal("2.00")
    assert track["properties"]["changed_fields"] == ["amount"]


def test_queryset_update_of_untracked_fields_records_nothing(outbox, shop):
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    outbox.clear()
    assert django_cdp.queryset_update(Payout.objects.all(), created_at=shop.created_at) == 1
    assert outbox.rows() == []


def test_bulk_helpers_reject_unregistered_models(outbox):
    with pytest.raises(TypeError, match="not registered"):
        django_cdp.bulk_create([Plan(name="x", monthly_price=1)])
