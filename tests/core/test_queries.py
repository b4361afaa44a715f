"""What a tracked create and update cost in SQL statements, pinned.

Inside ``atomic()`` a tracked Payout create adds two statements to the user's
INSERT: the message INSERT, and one SELECT of the owner's traits with the
digest of its last identify (every change re-identifies its owner when its
traits differ; when they are unchanged nothing more is written). An update
adds the narrow read of the tracked columns before it. With ``CONSENT`` a change
reads its owner's consent once more. Nothing of ours opens a transaction or
savepoint inside the user's.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import transaction

from example_project.payouts.models import Payout

pytestmark = pytest.mark.signals_only(reason="counts the signal engine's statements")


def statements(queries) -> list[str]:
    return [q["sql"].split()[0].upper() for q in queries]


def test_tracked_create_inside_atomic(outbox, shop, django_assert_num_queries):
    with django_assert_num_queries(5) as queries, transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert statements(queries) == ["BEGIN", "INSERT", "SELECT", "INSERT", "COMMIT"]


def test_tracked_update_inside_atomic(outbox, shop, django_assert_num_queries):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    payout.amount = Decimal("2.00")
    with django_assert_num_queries(6) as queries, transaction.atomic():
        payout.save()
    assert statements(queries) == ["BEGIN", "SELECT", "UPDATE", "SELECT", "INSERT", "COMMIT"]


def test_tracked_create_in_autocommit_adds_one_insert_and_no_transaction(
    outbox, shop, django_assert_num_queries
):
    with django_assert_num_queries(3) as queries:
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert statements(queries) == ["INSERT", "SELECT", "INSERT"]


def test_tracked_update_in_autocommit(outbox, shop, django_assert_num_queries):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    payout.amount = Decimal("2.00")
    with django_assert_num_queries(4) as queries:
        payout.save()
    assert statements(queries) == ["SELECT", "UPDATE", "SELECT", "INSERT"]


def test_save_without_a_tracked_change_reads_the_columns_and_the_traits(
    outbox, shop, django_assert_num_queries
):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    with django_assert_num_queries(3) as queries:
        payout.save()
    assert statements(queries) == ["SELECT", "UPDATE", "SELECT"]
    assert outbox.events() == ["Payout Created"]


def test_a_never_identified_owner_is_identified_at_its_first_tracked_change(
    outbox, shop, django_assert_num_queries
):
    from django_cdp.models import TraitsDigest

    TraitsDigest.objects.all().delete()  # as if the shop predates django-cdp
    with django_assert_num_queries(7) as queries, transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    # the payout, the traits with their digest, the track, the identify, the digest upsert
    assert statements(queries) == [
        "BEGIN",
        "INSERT",
        "SELECT",
        "INSERT",
        "INSERT",
        "INSERT",
        "COMMIT",
    ]
    assert outbox.identifies()[0]["userId"] == str(shop.pk)


def test_changed_identity_costs_an_identify_insert_and_a_digest_upsert(
    outbox, shop, django_assert_num_queries
):
    shop.email = "new@acme.example"
    with django_assert_num_queries(6) as queries:
        shop.save(update_fields=["email"])  # email is a trait, not a tracked property
    assert statements(queries) == ["UPDATE", "SELECT", "BEGIN", "INSERT", "INSERT", "COMMIT"]


def test_with_send_unchanged_identify_every_change_sends_traits(
    outbox, shop, settings, django_assert_num_queries
):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND_UNCHANGED_IDENTIFY": True}
    with django_assert_num_queries(7) as queries, transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert statements(queries) == [
        "BEGIN",
        "INSERT",
        "SELECT",
        "INSERT",
        "INSERT",
        "INSERT",
        "COMMIT",
    ]


def consent_reads(queries) -> list[str]:
    return [q["sql"] for q in queries if "analytics_opt_in" in q["sql"]]


def test_with_consent_a_save_reads_it_once(outbox, shop, settings, django_assert_num_queries):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "CONSENT": "analytics_opt_in"}
    with django_assert_num_queries(6) as queries, transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    # the payout, the owner's consent, the traits with their digest, the track
    assert statements(queries) == ["BEGIN", "INSERT", "SELECT", "SELECT", "INSERT", "COMMIT"]
    assert len(consent_reads(queries)) == 1
    assert outbox.events() == ["Payout Created"]


def test_with_consent_a_delete_reads_it_once(outbox, shop, settings, django_assert_num_queries):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "CONSENT": "analytics_opt_in"}
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    with django_assert_num_queries(6) as queries, transaction.atomic():
        payout.delete()
    # the owner's consent, the track, the payout's DELETE, the traits with their digest
    assert len(consent_reads(queries)) == 1
    assert statements(queries) == ["BEGIN", "SELECT", "INSERT", "DELETE", "SELECT", "COMMIT"]
    assert outbox.events() == ["Payout Created", "Payout Deleted"]
