"""What needs Python runs when delivery claims a trigger-written message, once."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.db import connection, transaction

from django_cdp import delivery, payloads
from django_cdp.capture import deferred
from django_cdp.models import Message
from django_cdp.signals import message_created
from example_project.payouts.models import Payout
from tests.triggers.test_triggers import django_cdp_settings

pytestmark = pytest.mark.postgres

HOOKS = "tests.validation.hooks."


def claim() -> list[delivery.Claimed]:
    """Claim a batch as a drain does: the deferred statements expanded first."""
    deferred.expand()
    return delivery.claim(
        "default", "test-token", max_messages=100, max_bytes=500_000, lease_seconds=60
    ).rows


def test_the_enrichment_hook_runs_at_the_claim_and_once(shop):
    with django_cdp_settings(ENRICH_MESSAGE=HOOKS + "amount_as_text"):
        Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
        deferred.expand()
        (stored,) = Message.objects.filter(type="track")
        assert stored.data["properties"]["amount"] == Decimal("5.00")  # as the trigger wrote it
        assert stored.capture is not None
        (row,) = claim()
    stored.refresh_from_db()
    assert stored.data["properties"]["amount"] == "5.00"  # the hook ran
    assert row.payload == stored.payload  # and what is sent is what is stored
    assert stored.capture is None  # finished: a retry does not rerun it
    assert stored.xid is not None  # kept: the claim writes no indexed column


def test_claiming_trigger_written_rows_updates_them_in_place(shop):
    """The claim of a trigger's rows is a HOT update: no new entry in any outbox index."""
    for amount in ("1", "2", "3"):
        Payout.objects.create(shop=shop, amount=Decimal(amount), currency="EUR")
    deferred.expand()
    assert Message.objects.filter(type="track", xid__isnull=False).count() == 3

    def updates() -> tuple[int, int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = %s",
                [Message._meta.db_table],
            )
            row = cursor.fetchone()
        return (row[0], row[1]) if row else (0, 0)

    with transaction.atomic():  # the statistics of one transaction, read inside it
        before = updates()
        assert len(claim()) == 3
        after = updates()
    updated, in_place = after[0] - before[0], after[1] - before[1]
    assert updated >= 3 and in_place == updated


def test_block_mode_keeps_a_violating_message_back_at_the_claim(shop):
    plan = {"VALIDATION": "block", "ENRICH_MESSAGE": HOOKS + "big_payouts_get_a_flag"}
    with django_cdp_settings(**plan):
        Payout.objects.create(shop=shop, amount=Decimal("5000"), currency="EUR")
        Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
        rows = claim()
    assert len(rows) == 1  # only the conforming one is sent
    blocked = Message.objects.get(status="blocked")
    assert "Additional-Properties" in str(blocked.violations)
    assert (blocked.locked_by, blocked.attempts) == ("", 0)


def test_a_message_that_breaks_the_plan_is_kept_back_without_any_hook(shop):
    """With no hook and no listener the claim checks each message quickly, and still keeps
    back one the plan refuses: here as a column whose type drifted from its model field
    (a text ``amount``) makes the trigger write it."""
    Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
    deferred.expand()
    good = Message.objects.get(type="track")
    drifted = json.loads(good.payload)
    drifted["properties"]["amount"] = "five"
    drifted["messageId"] = "drifted"
    Message.objects.create(
        message_id="drifted",
        type="track",
        event=good.event,
        user_id=good.user_id,
        payload=payloads.encode(drifted),
        source_model=good.source_model,
        source_pk=good.source_pk,
        xid=good.xid,
        capture=good.capture,
    )
    with django_cdp_settings(VALIDATION="block"):
        rows = claim()
    assert [row.message_id for row in rows] == [good.message_id]
    blocked = Message.objects.get(message_id="drifted")
    assert blocked.status == "blocked"
    assert "/properties/amount" in str(blocked.violations)


def test_message_created_is_sent_at_the_claim(shop):
    seen = []

    def receiver(sender, message, **kwargs):
        seen.append((message.pk, message.event))

    message_created.connect(receiver, weak=False)
    try:
        Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
        assert seen == []  # nothing ran at write time: it was a trigger
        (row,) = claim()
    finally:
        message_created.disconnect(receiver)
    assert seen == [(row.id, "Payout Created")]


def test_a_raising_hook_fails_the_message_at_the_claim(shop):
    with django_cdp_settings(ENRICH_MESSAGE="tests.core.hooks.broken"):
        payout = Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
        assert claim() == []
    failed = Message.objects.get(status="failed")
    assert failed.last_error == f"payouts.Payout pk={payout.pk}: RuntimeError: enrichment failed"
