"""``drain()`` in this process against the loopback data plane: claims, batching, outcomes."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from django_cdp import delivery, transport
from django_cdp.delivery import claim, drain
from django_cdp.models import DeliveryEndpoint, Message, TraitsDigest
from django_cdp.signals import message_failed, message_sent
from tests.delivery.conftest import make_messages, statuses

pytestmark = pytest.mark.django_db


def _expire_leases() -> None:
    Message.objects.update(locked_until=timezone.now() - timedelta(seconds=1))


def test_one_request_with_every_message_and_sent_at(configure, data_plane):
    rows = make_messages(5) + make_messages(2, kind="identify")
    result = drain()
    assert (result.sent, result.requests) == (7, 1)
    assert statuses() == {"sent": 7}
    received = data_plane.messages
    for row, message in zip(rows, received, strict=True):
        sent_at = message.pop("sentAt")
        assert message == json.loads(row.payload)
        assert sent_at.endswith("Z")
    row = Message.objects.get(pk=rows[0].pk)
    assert (row.attempts, row.last_response_code, row.locked_by, row.locked_until) == (
        1,
        200,
        "",
        None,
    )
    assert row.sent_at is not None


def test_batches_respect_message_and_byte_limits(configure, data_plane):
    configure(MAX_BATCH_MESSAGES=10)
    make_messages(25)
    assert drain().requests == 3
    assert [len(r.message_ids) for r in data_plane.requests] == [10, 10, 5]

    data_plane.reset()
    Message.objects.update(status="pending", next_attempt_at=Now())  # the claim's clock
    configure(MAX_BATCH_BYTES=2000, MAX_BATCH_MESSAGES=2500)
    result = drain()
    assert result.sent == 25 and result.requests > 3
    assert all(r.body_bytes <= 2000 for r in data_plane.requests)
    assert sorted(data_plane.message_ids()) == sorted(
        Message.objects.values_list("message_id", flat=True)
    )


def test_backoff_grows_jitters_caps_and_honours_retry_after(settings, configure):
    configure(RETRY_BACKOFF_BASE=10.0, RETRY_BACKOFF_MAX=3600.0)
    for attempts, nominal in [(1, 10), (2, 30), (3, 90), (9, 3600)]:
        delays = [delivery.backoff_seconds(attempts) for _ in range(200)]
        assert nominal * 0.75 <= min(delays) <= max(delays) <= nominal * 1.25
        assert max(delays) - min(delays) > nominal * 0.1  # jittered
    assert delivery.backoff_seconds(1, retry_after=120) >= 120
    assert delivery.backoff_seconds(1, retry_after=10**9) <= 3600 * 1.25
    configure(CONFIG_ERROR_RETRY_SECONDS=500)
    assert delivery.config_error_delay() == 60


def test_default_schedule_spans_about_a_day(configure):
    configure(RETRY_BACKOFF_BASE=10.0, RETRY_BACKOFF_MAX=12 * 3600.0)
    nominal = sum(min(12 * 3600, 10 * 3 ** (n - 1)) for n in range(1, 10))
    assert 18 * 3600 < nominal < 30 * 3600


def test_claim_leases_rows_and_counts_the_attempt(configure):
    make_messages(3)
    batch = claim("default", "a", max_messages=10, max_bytes=500_000, lease_seconds=60)
    assert [r.attempts for r in batch.rows] == [1, 1, 1] and not batch.more
    assert claim("default", "b", max_messages=10, max_bytes=500_000, lease_seconds=60).rows == []
    row = Message.objects.first()
    assert row.locked_by == "a" and row.locked_until > timezone.now()
    assert row.next_attempt_at <= timezone.now()  # left alone: the claim is a HOT update
    _expire_leases()  # the worker died: the rows are due again
    again = claim("default", "b", max_messages=2, max_bytes=500_000, lease_seconds=60)
    assert [r.attempts for r in again.rows] == [2, 2] and again.more


def test_fenced_write_back_after_lease_expiry(configure):
    make_messages(2)
    run = delivery._Run("default", "w")
    first = claim("default", "a", max_messages=10, max_bytes=500_000, lease_seconds=60).rows
    _expire_leases()
    second = claim("default", "b", max_messages=10, max_bytes=500_000, lease_seconds=60).rows
    run.mark_sent("a", first, 200)  # too late: b owns the rows now
    assert run.result.sent == 0 and statuses() == {"pending": 2}
    run.mark_sent("b", second, 200)
    assert run.result.sent == 2 and statuses() == {"sent": 2}


def test_send_false_marks_skipped_without_requests(configure, data_plane):
    configure(SEND=False)
    make_messages(4)
    assert drain().skipped == 4
    assert statuses() == {"skipped": 4} and data_plane.requests == []


@pytest.mark.parametrize("missing", ["WRITE_KEY", "DATA_PLANE_URL"])
def test_empty_key_or_url_sends_nothing(configure, data_plane, missing):
    configure(**{missing: ""})
    make_messages(3)
    assert drain().claimed == 0
    assert statuses() == {"pending": 3} and data_plane.requests == []
    assert set(Message.objects.values_list("attempts", flat=True)) == {0}


def test_poisoned_message_is_isolated_by_bisection(configure, data_plane):
    rows = make_messages(20, missing_user=(13,))
    result = drain()
    assert (result.sent, result.failed) == (19, 1)
    poisoned = Message.objects.get(pk=rows[13].pk)
    assert poisoned.status == "failed" and poisoned.last_response_code == 400
    assert poisoned.last_error == "HTTP 400: request neither has anonymousId nor userId"
    assert rows[13].message_id not in data_plane.message_ids()


def test_config_error_keeps_messages_pending_and_is_loud(configure, data_plane, caplog):
    configure(WRITE_KEY="wrong-key")
    make_messages(5)
    with caplog.at_level(logging.ERROR, "django_cdp.delivery"):
        result = drain()
    assert (result.config_errors, result.sent, result.requests) == (5, 0, 1)
    assert "refused the write key" in caplog.text and "wrong-key" not in caplog.text
    row = Message.objects.first()
    assert (row.status, row.attempts, row.last_response_code) == ("pending", 0, 401)
    assert row.last_error == "HTTP 401: invalid write key"
    assert row.next_attempt_at <= timezone.now() + timedelta(seconds=60)
    assert (row.locked_by, row.locked_until) == ("", None)


def test_redirect_keeps_messages_pending_without_spending_an_attempt(configure, data_plane):
    data_plane.status_sequence.append(302)
    make_messages(5)
    result = drain()
    assert (result.config_errors, result.requests) == (5, 1)
    row = Message.objects.first()
    assert (row.status, row.attempts, row.last_response_code) == ("pending", 0, 302)
    assert row.last_error.startswith("HTTP 302: redirected (302) to ")


def test_a_request_never_outlives_the_lease(configure, data_plane):
    # CONNECT_TIMEOUT + READ_TIMEOUT (7 s) exceeds the lease: the request is cut where the
    # lease ends, so no other worker (and no erasure) can see the lease over while it runs.
    configure(LEASE_SECONDS=2, CONNECT_TIMEOUT=2.0, READ_TIMEOUT=5.0)
    data_plane.hang.set()
    make_messages(1)
    started = time.monotonic()
    assert drain().retrying == 1
    assert time.monotonic() - started < 3  # the request, then the write-back
    row = Message.objects.get()
    deadline = re.fullmatch(
        r"timeout: no answer within the request's deadline of (.+) s", row.last_error
    )
    assert deadline and float(deadline[1]) <= 2.0  # not 7 s
    assert row.delivery_attempts.get().duration_ms < 2100  # the timer's own latency


def test_rows_erased_after_the_claim_are_left_out_of_the_next_request(
    transactional_db, configure, data_plane, monkeypatch
):
    rows = make_messages(4, users=2)  # users 1, 2, 1, 2
    data_plane.reject_message_ids = {rows[1].message_id}  # forces bisection
    real = transport.post_batch

    def post_batch(*args: Any, **kwargs: Any) -> transport.Response:
        response = real(*args, **kwargs)
        Message.objects.filter(user_id="1").delete()  # erased during the first request
        return response

    monkeypatch.setattr(transport, "post_batch", post_batch)
    result = drain()
    assert (result.sent, result.failed) == (1, 1)
    assert [r.message_ids for r in data_plane.requests[1:]] == [
        [rows[1].message_id],
        [rows[3].message_id],
    ]
    assert data_plane.message_ids() == [rows[3].message_id]


def test_server_errors_back_off_and_stop_the_drain(configure, data_plane):
    configure(MAX_BATCH_MESSAGES=5, RETRY_BACKOFF_BASE=30.0, RETRY_BACKOFF_MAX=3600.0)
    data_plane.status_sequence.extend([503])
    make_messages(20)
    result = drain()
    assert (result.retrying, result.requests) == (5, 1)
    retried = Message.objects.filter(attempts=1)
    assert retried.count() == 5
    assert all(m.next_attempt_at > timezone.now() + timedelta(seconds=20) for m in retried)
    assert {m.last_response_code for m in retried} == {503}
    # The others were never claimed, so still due, but the data plane backs off first...
    assert drain().waiting == 1
    DeliveryEndpoint.objects.update(next_try_at=timezone.now() - timedelta(seconds=1))
    # ...then one probe, of rows never tried, and, answered, the rest.
    result = drain()
    assert (result.sent, result.requests) == (15, 3)
    assert not {m.message_id for m in retried} & set(data_plane.requests[1].message_ids)


def test_out_of_attempts_dead_letters_and_forgets_the_traits(configure, data_plane):
    configure(MAX_ATTEMPTS=3)
    identify = make_messages(1, kind="identify")[0]
    TraitsDigest.objects.create(user_id="1", digest="d", message_id=identify.message_id)
    TraitsDigest.objects.create(user_id="2", digest="d", message_id="other")
    Message.objects.update(attempts=2)
    data_plane.status_sequence.extend([500])
    failed = []
    message_failed.connect(lambda sender, message, **kw: failed.append(message), weak=False)
    try:
        assert drain().failed == 1
    finally:
        message_failed.receivers.clear()
        message_failed.sender_receivers_cache.clear()
    row = Message.objects.get()
    assert row.status == "failed" and row.last_error.startswith(
        "gave up after 3 attempts: HTTP 500"
    )
    assert [m.pk for m in failed] == [row.pk]
    assert list(TraitsDigest.objects.values_list("user_id", flat=True)) == ["2"]


def test_oversized_message_fails_at_send_and_others_go(configure, data_plane):
    configure(MAX_MESSAGE_BYTES=1000)
    make_messages(3)
    big = make_messages(1, extra={"properties": {"blob": "x" * 2000}})[0]
    result = drain()
    assert (result.sent, result.failed) == (3, 1)
    assert Message.objects.get(pk=big.pk).last_error.startswith("message is ")


def test_sent_signal(configure, data_plane):
    got = []

    def receiver(sender, message, **kwargs):
        got.append(message.message_id)

    message_sent.connect(receiver)
    try:
        rows = make_messages(3)
        drain()
    finally:
        message_sent.disconnect(receiver)
    assert got == [r.message_id for r in rows]


def test_lease_running_out_releases_the_rest(configure, data_plane):
    configure(LEASE_SECONDS=1)
    data_plane.delay = 0.6
    make_messages(8, missing_user=(0,))  # forces bisection: several requests in one lease
    result = drain()
    assert result.released > 0
    assert statuses().get("pending") == result.released
    released = Message.objects.filter(status="pending")
    assert set(released.values_list("attempts", flat=True)) == {0}


def test_cdp_deliver_command_drains_once(configure, data_plane, capsys):
    make_messages(4)
    call_command("cdp_deliver")
    assert "sent 4" in capsys.readouterr().out
    assert statuses() == {"sent": 4}


def test_sqlite_claim_is_conditional(configure):
    """Without SKIP LOCKED a claim only takes rows that are still due when it updates them."""
    make_messages(2)
    Message.objects.filter(pk=Message.objects.order_by("id")[0].pk).update(
        next_attempt_at=F("next_attempt_at") + timedelta(hours=1)
    )
    batch = claim("default", "a", max_messages=10, max_bytes=500_000, lease_seconds=60)
    assert len(batch.rows) == 1


def test_a_batch_released_before_its_request_does_not_end_the_drain(
    configure, data_plane, monkeypatch
):
    # The first claim is slow (half its lease gone before the request): its rows are given
    # back unsent, and the drain claims again (the next claim could not overlap a request).
    configure(MAX_BATCH_MESSAGES=5)
    make_messages(10)
    real = delivery._Run.next_round
    calls = []

    def next_round(self: delivery._Run, **kwargs: Any) -> delivery.Round | None:
        current = real(self, **kwargs)
        calls.append(current)
        if len(calls) == 1 and current is not None:
            current = current._replace(claimed_at=current.claimed_at - self.lease)
        return current

    monkeypatch.setattr(delivery._Run, "next_round", next_round)
    result = drain()
    assert (result.released, result.sent) == (5, 10)
    assert statuses() == {"sent": 10}


def test_the_next_batch_is_claimed_while_the_request_is_out(configure, data_plane, monkeypatch):
    configure(MAX_BATCH_MESSAGES=5)
    make_messages(15)
    data_plane.delay = 0.2
    events: list[str] = []
    real_claim, real_post = delivery.claim, transport.post_batch

    def claim_(*args: Any, **kwargs: Any) -> delivery.Batch:
        events.append("claim")
        return real_claim(*args, **kwargs)

    def post_batch(*args: Any, **kwargs: Any) -> transport.Response:
        response = real_post(*args, **kwargs)
        events.append("answered")
        return response

    monkeypatch.setattr(delivery, "claim", claim_)
    monkeypatch.setattr(transport, "post_batch", post_batch)
    assert drain().sent == 15
    # The request of a batch runs on the sender thread while this one claims the next.
    assert events[:4] == ["claim", "claim", "answered", "claim"]
