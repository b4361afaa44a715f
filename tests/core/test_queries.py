"""What a tracked create and update cost in SQL statements, pinned.

Inside ``atomic()`` a tracked Payout create adds one statement to the user's
INSERT: the message INSERT (a Payout cannot change its shop's traits, so they
are not read back). An update adds the narrow read of the tracked columns
before it. A change that can alter traits reads them together with their last
digest in one SELECT.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import transaction

from example_project.payouts.models import Payout


def statements(queries) -> list[str]:
    return [q["sql"].split()[0].upper() for q in queries]


def test_tracked_create_inside_atomic(outbox, shop, django_assert_num_queries):
    with django_assert_num_queries(4) as queries, transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert statements(queries) == ["BEGIN", "INSERT", "INSERT", "COMMIT"]


def test_tracked_update_inside_atomic(outbox, shop, django_assert_num_queries):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    payout.amount = Decimal("2.00")
    with django_assert_num_queries(5) as queries, transaction.atomic():
        payout.save()
    assert statements(queries) == ["BEGIN", "SELECT", "UPDATE", "INSERT", "COMMIT"]


def test_tracked_create_in_autocommit_adds_one_insert_and_no_transaction(
    outbox, shop, django_assert_num_queries
):
    with django_assert_num_queries(2) as queries:
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert statements(queries) == ["INSERT", "INSERT"]


def test_tracked_update_in_autocommit(outbox, shop, django_assert_num_queries):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    payout.amount = Decimal("2.00")
    with django_assert_num_queries(3) as queries:
        payout.save()
    assert statements(queries) == ["SELECT", "UPDATE", "INSERT"]


def test_save_without_a_tracked_change_costs_one_narrow_read(
    outbox, shop, django_assert_num_queries
):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    with django_assert_num_queries(2) as queries:
        payout.save()
    assert statements(queries) == ["SELECT", "UPDATE"]
    assert outbox.events() == ["Payout Created"]


def test_changed_identity_costs_an_identify_insert_and_a_digest_upsert(
    outbox, shop, django_assert_num_queries
):
    shop.email = "new@acme.example"
    with django_assert_num_queries(6) as queries:
        shop.save(update_fields=["email"])  # email is a trait, not a tracked property
    assert statements(queries) == ["UPDATE", "BEGIN", "SELECT", "INSERT", "INSERT", "COMMIT"]


def test_with_send_unchanged_identify_every_change_reads_and_sends_traits(
    outbox, shop, settings, django_assert_num_queries
):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND_UNCHANGED_IDENTIFY": True}
    with django_assert_num_queries(7) as queries, transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    # the payout, its track, traits + digest in one read, the identify, the digest upsert
    assert statements(queries) == [
        "BEGIN",
        "INSERT",
        "INSERT",
        "SELECT",
        "INSERT",
        "INSERT",
        "COMMIT",
    ]
