"""``manage.py cdp_purge`` and ``django_cdp.tasks.purge``: retention and erasure."""

from __future__ import annotations

import datetime
import io
import logging
import time
import uuid

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from django_cdp import retention, tasks
from django_cdp.models import Message, TraitsDigest
from django_cdp.registry import registry
from tests.settings import DJANGO_CDP

STATUSES = ("pending", "sent", "failed", "blocked", "skipped")


def make(status: str, age_days: float, user_id: str = "1", n: int = 1, using="default") -> None:
    created = timezone.now() - datetime.timedelta(days=age_days)
    Message.objects.using(using).bulk_create(
        [
            Message(
                message_id=str(uuid.uuid4()),
                type="track",
                event="Payout Created",
                user_id=user_id,
                payload="{}",
                status=status,
                created_at=created,
            )
            for _ in range(n)
        ]
    )


def remaining(using="default") -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    now = timezone.now()
    for status, created in Message.objects.using(using).values_list("status", "created_at"):
        key = (status, (now - created).days)
        out[key] = out.get(key, 0) + 1
    return out


def purge(*args: str) -> str:
    out = io.StringIO()
    call_command("cdp_purge", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def aged(transactional_db):
    for status in STATUSES:
        make(status, 40)
        make(status, 5)


def test_older_than_deletes_only_old_sent_and_skipped_messages(aged):
    out = purge("--older-than", "30")

    assert remaining() == {
        ("pending", 40): 1,
        ("failed", 40): 1,
        ("blocked", 40): 1,
        **{(status, 5): 1 for status in STATUSES},
    }
    assert "Deleted 2 sent, skipped or superseded message(s) older than 30 day(s)" in out


def test_pending_failed_and_blocked_are_never_deleted_even_with_one_day(aged):
    purge("--older-than", "1")
    assert sorted({status for status, _ in remaining()}) == ["blocked", "failed", "pending"]
    assert len(remaining()) == 6


def test_old_superseded_identifies_are_purged_like_sent_ones(transactional_db):
    make("superseded", 40)
    make("superseded", 5)
    purge("--older-than", "30")
    assert remaining() == {("superseded", 5): 1}


def test_dry_run_counts_and_deletes_nothing(aged):
    out = purge("--older-than", "30", "--dry-run")
    assert (
        "Dry run: 2 sent, skipped or superseded message(s) older than 30 day(s) would be deleted."
        in out
    )
    assert Message.objects.count() == 10


def test_deletes_in_batches_by_id_range(transactional_db):
    make("sent", 40, n=23)
    make("pending", 40, n=2)
    with CaptureQueriesContext(connection) as ctx:
        out = purge("--older-than", "30", "--batch-size", "5")
    sqls = [q["sql"] for q in ctx.captured_queries]
    # Each batch: the collector reads the ids under the batch's conditions, then deletes
    # the messages' delivery attempts (CASCADE) and the messages by id, in one transaction.
    reads = [sql for sql in sqls if sql.startswith('SELECT "django_cdp_message"."id" FROM')]
    deletes = [sql for sql in sqls if sql.startswith('DELETE FROM "django_cdp_message"')]
    assert len(reads) == len(deletes) == 5  # 5 + 5 + 5 + 5 + 3
    assert all('"id" >' in sql and "status" in sql for sql in reads)
    assert "Deleted 23 sent, skipped or superseded message(s)" in out and "in 5 batch(es)" in out
    assert Message.objects.filter(status="pending").count() == 2


def test_default_age_is_the_retention_days_setting(transactional_db):
    make("sent", 12)
    make("sent", 8)
    with override_settings(DJANGO_CDP={**DJANGO_CDP, "RETENTION_DAYS": 10}):
        purge()
    assert remaining() == {("sent", 8): 1}


def test_retention_days_zero_keeps_everything(transactional_db):
    make("sent", 400)
    with override_settings(DJANGO_CDP={**DJANGO_CDP, "RETENTION_DAYS": 0}):
        assert "nothing purged" in purge()
        assert tasks.purge() == {"deleted": 0, "batches": 0}
    assert Message.objects.count() == 1


def test_the_task_purges_with_retention_days(transactional_db):
    make("sent", 31)
    make("skipped", 31)
    make("failed", 31)
    make("sent", 29)

    result = tasks.purge.apply().get()  # the default RETENTION_DAYS, 30

    assert result["deleted"] == 2
    assert remaining() == {("failed", 31): 1, ("sent", 29): 1}


def test_the_beat_schedule_ships_a_daily_purge_next_to_the_sweep():
    entry = tasks.BEAT_SCHEDULE["django-cdp-purge"]
    assert entry["task"] == "django_cdp.tasks.purge" == tasks.purge.name
    assert entry["schedule"] == 24 * 3600
    assert "django-cdp-sweep" in tasks.BEAT_SCHEDULE


def test_retention_days_is_a_checked_setting():
    with override_settings(DJANGO_CDP={**DJANGO_CDP, "RETENTION_DAYS": "30"}):
        problems = [p.msg for p in registry.problems]
    assert any("RETENTION_DAYS" in msg and "must be int" in msg for msg in problems)


def test_user_id_erases_every_message_and_the_digest_of_one_user(transactional_db):
    for status in STATUSES:
        make(status, 1, user_id="42")
    make("sent", 1, user_id="7")
    TraitsDigest.objects.create(user_id="42", digest="x" * 64, message_id="m")
    TraitsDigest.objects.create(user_id="7", digest="y" * 64, message_id="n")

    out = purge("--user-id", "42")

    assert list(Message.objects.values_list("user_id", flat=True)) == ["7"]
    assert list(TraitsDigest.objects.values_list("user_id", flat=True)) == ["7"]
    assert "userId '42': deleted 5 message(s) and 1 traits digest(s)." in out
    assert "deletion request there too" in out
    assert "Data Regulation API" in out


def _lease(user_id: str, seconds: float) -> None:
    """Make the user's messages look claimed by a worker whose lease ends in ``seconds``."""
    Message.objects.filter(user_id=user_id).update(
        locked_by="host:1:abcd", locked_until=timezone.now() + datetime.timedelta(seconds=seconds)
    )


def test_erasure_waits_until_the_lease_of_claimed_messages_ends(transactional_db, caplog):
    make("pending", 0, user_id="42", n=2)
    make("pending", 0, user_id="43")
    _lease("42", 1.5)
    _lease("43", 30)  # another user's claim is no reason to wait
    make("pending", 0, user_id="42")  # not claimed
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "django_cdp.retention"):
        result = retention.erase_user("42")
    took = time.monotonic() - started
    assert (result.messages, result.in_flight) == (3, 2)
    assert 1.3 < result.in_flight_seconds <= 1.6  # SQLite: the database clock has ms precision
    wait = result.in_flight_seconds + retention.ERASURE_GRACE_SECONDS
    assert wait - 0.1 < took < wait + 1
    assert "2 message(s) were claimed by a delivery worker; waiting" in caplog.text
    assert list(Message.objects.values_list("user_id", flat=True)) == ["43"]


def test_erasure_without_waiting_says_how_long_a_request_may_run(transactional_db):
    make("pending", 0, user_id="42")
    _lease("42", 20)
    started = time.monotonic()
    result = retention.erase_user("42", wait=False)
    assert time.monotonic() - started < 5
    assert (result.messages, result.in_flight) == (1, 1)
    assert 15 < result.in_flight_seconds <= 20.1  # SQLite: the database clock has ms precision


def test_an_expired_lease_is_not_waited_for(transactional_db):
    make("pending", 0, user_id="42")
    _lease("42", -5)  # its worker died; its request ended with the lease
    result = retention.erase_user("42")
    assert (result.messages, result.in_flight, result.in_flight_seconds) == (1, 0, 0.0)


def test_user_id_dry_run_counts(transactional_db):
    make("pending", 1, user_id="42", n=3)
    out = purge("--user-id", "42", "--dry-run")
    assert "would delete 3 message(s) and 0 traits digest(s)" in out
    assert Message.objects.count() == 3


def test_erased_shop_is_identified_again_on_its_next_change(transactional_db):
    from decimal import Decimal

    from example_project.shops.models import Plan, Shop

    plan = Plan.objects.create(name="Growth", monthly_price=Decimal("1"))
    shop = Shop.objects.create(domain="a.example", email="a@a.example", plan=plan)
    purge("--user-id", str(shop.pk))
    assert not Message.objects.exists()

    shop.active = False
    shop.save()
    assert sorted(Message.objects.values_list("type", flat=True)) == ["identify", "track"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--older-than", "1", "--user-id", "1"], "not both"),
        (["--older-than", "-1"], "0 or more"),
        (["--user-id", ""], "non-empty"),
        (["--batch-size", "0"], "at least 1"),
    ],
)
def test_bad_arguments(transactional_db, args, message):
    with pytest.raises(CommandError, match=message):
        purge(*args)


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_database_option():
    make("sent", 40, using="other")
    make("sent", 40)
    call_command("cdp_purge", "--older-than", "30", "--database", "other", stdout=io.StringIO())
    assert not Message.objects.using("other").exists()
    assert Message.objects.using("default").count() == 1
