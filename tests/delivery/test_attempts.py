"""Failed delivery attempts: one ``DeliveryAttempt`` row per message and failed request.

What each kind of failure records (code, excerpt, error, duration, worker), that a
success records nothing (and costs no extra query), that the rows are written with
the fenced outcome even when the fence lost some rows, and that purge and erasure
take them with their messages.
"""

from __future__ import annotations

import base64
import datetime
import io
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_cdp import delivery, transport
from django_cdp.delivery import drain
from django_cdp.models import DeliveryAttempt, DeliveryEndpoint, Message, TraitsDigest
from tests.delivery.conftest import WRITE_KEY, make_messages, statuses

pytestmark = pytest.mark.django_db

ATTEMPT_TABLE = DeliveryAttempt._meta.db_table


def _make_due() -> None:
    """Skip the backoff: the rows that wait for a retry, and the data plane, are due now."""
    Message.objects.filter(status="pending").update(
        next_attempt_at=timezone.now() - datetime.timedelta(seconds=1)
    )
    DeliveryEndpoint.objects.update(next_try_at=timezone.now() - datetime.timedelta(seconds=1))


def _attempts(**filters: Any) -> list[DeliveryAttempt]:
    return list(DeliveryAttempt.objects.filter(**filters).order_by("id"))


def test_503_then_success_records_one_retry(configure, data_plane):
    row = make_messages(1)[0]
    data_plane.status_sequence.append(503)
    data_plane.delay = 0.1
    assert drain().retrying == 1
    data_plane.delay = 0.0
    _make_due()
    assert drain().sent == 1

    assert Message.objects.get(pk=row.pk).status == "sent"
    [attempt] = _attempts()
    assert attempt.message_id == row.pk
    assert (attempt.number, attempt.outcome, attempt.response_code) == (1, "retry", 503)
    assert attempt.response_excerpt == "injected fault"
    assert attempt.error == ""
    assert attempt.duration_ms is not None and 100 <= attempt.duration_ms < 5000
    assert attempt.worker.startswith(delivery.default_worker_id() + ":")
    assert attempt.at is not None and abs(timezone.now() - attempt.at).total_seconds() < 60


def test_refused_message_records_the_body_and_bisection_records_nothing(configure, data_plane):
    rows = make_messages(6, missing_user=(4,))
    result = drain()
    assert (result.sent, result.failed) == (5, 1)
    assert result.requests > 2  # halving requests were answered 400 too
    [attempt] = _attempts()
    assert attempt.message_id == rows[4].pk
    assert (attempt.outcome, attempt.response_code, attempt.number) == ("refused", 400, 1)
    assert attempt.response_excerpt == "request neither has anonymousId nor userId"
    assert attempt.duration_ms is not None


def _answer_with(data_plane, status: int, text: str) -> None:
    """Make the data plane answer every request with ``status`` and ``text``."""
    data_plane._check = lambda path, headers, raw: (status, text, [], 0)


def test_401_records_a_config_error_with_the_write_key_masked(configure, data_plane):
    token = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    _answer_with(data_plane, 401, f"invalid write key {WRITE_KEY} (Authorization: Basic {token})")
    rows = make_messages(3)
    assert drain().config_errors == 3

    attempts = _attempts()
    assert [a.message_id for a in attempts] == [r.pk for r in rows]
    for attempt in attempts:
        assert (attempt.outcome, attempt.response_code) == ("config_error", 401)
        # The attempt was given back on the row, but this was still its first try.
        assert attempt.number == 1
        assert WRITE_KEY not in attempt.response_excerpt and token not in attempt.response_excerpt
        assert attempt.response_excerpt == "invalid write key *** (Authorization: Basic ***)"
    assert set(Message.objects.values_list("attempts", flat=True)) == {0}


def test_long_bodies_are_cut_to_the_excerpt_and_masked_across_the_cut(configure, data_plane):
    # The key straddles the transport's 2000-character limit: neither half may survive.
    body = "x" * (transport.MAX_BODY_CHARS - 5) + WRITE_KEY + "y" * 3000
    _answer_with(data_plane, 500, body)
    make_messages(1)
    drain()
    [attempt] = _attempts()
    assert len(attempt.response_excerpt) == DeliveryAttempt.EXCERPT_CHARS
    last_error = Message.objects.get().last_error
    assert WRITE_KEY[:5] not in last_error and "***" in last_error


def test_timeout_records_the_error_and_no_code(configure, data_plane):
    configure(READ_TIMEOUT=0.3)
    data_plane.delay = 1.0
    make_messages(2)
    assert drain().retrying == 2
    data_plane.delay = 0.0
    attempts = _attempts()
    assert len(attempts) == 2
    for attempt in attempts:
        assert (attempt.outcome, attempt.response_code, attempt.response_excerpt) == (
            "retry",
            None,
            "",
        )
        assert attempt.error.startswith("timeout: ReadTimeout")
        assert attempt.duration_ms is not None and attempt.duration_ms >= 300


def test_connection_error_records_the_error(configure, data_plane):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    configure(DATA_PLANE_URL=f"http://127.0.0.1:{port}")
    make_messages(1)
    drain()
    [attempt] = _attempts()
    assert attempt.outcome == "retry" and attempt.response_code is None
    assert attempt.error.startswith("connection error: ConnectionError")


def test_out_of_attempts_records_a_dead_letter_and_forgets_the_traits(configure, data_plane):
    configure(MAX_ATTEMPTS=2)
    identify = make_messages(1, kind="identify")[0]
    TraitsDigest.objects.create(user_id="1", digest="d", message_id=identify.message_id)
    data_plane.status_sequence.extend([502, 502])
    drain()
    _make_due()
    # Other messages went through meanwhile: the data plane is healthy, this message is not.
    DeliveryEndpoint.objects.update(failures=0)
    assert drain().failed == 1

    assert Message.objects.get().status == "failed"
    assert [(a.number, a.outcome, a.response_code) for a in _attempts()] == [
        (1, "retry", 502),
        (2, "dead_letter", 502),
    ]
    assert not TraitsDigest.objects.exists()


def test_unsendable_message_fails_without_an_attempt_row(configure, data_plane):
    configure(MAX_MESSAGE_BYTES=1000)
    make_messages(1, extra={"properties": {"blob": "x" * 2000}})
    assert drain().failed == 1
    assert not DeliveryAttempt.objects.exists()  # no request was made; last_error says why


def _drain_queries() -> list[str]:
    with CaptureQueriesContext(connection) as ctx:
        assert drain().sent == 5
    return [q["sql"] for q in ctx.captured_queries]


def test_success_writes_no_attempt_and_costs_no_extra_query(configure, data_plane):
    make_messages(5)
    queries = _drain_queries()
    assert not any(ATTEMPT_TABLE in sql for sql in queries)
    assert not DeliveryAttempt.objects.exists()
    # The whole successful drain: the data plane's state (one SELECT), claim (SELECT and
    # UPDATE; on PostgreSQL one UPDATE ... RETURNING) and outcome (UPDATE and the hourly
    # counter's upsert), each in a savepoint inside the test's transaction, plus
    # PostgreSQL's SET LOCAL per bookkeeping transaction, plus the re-read of the claimed
    # rows by id before the request (erasure wins over delivery); on PostgreSQL, whether a
    # statement the capture triggers deferred waits to become messages (one SELECT).
    expected = {"sqlite": 10, "postgresql": 12}[connection.vendor]
    assert len(queries) == expected, queries


def test_a_failed_request_costs_one_insert(configure, data_plane):
    make_messages(5)
    data_plane.status_sequence.append(503)
    with CaptureQueriesContext(connection) as ctx:
        drain()
    inserts = [q["sql"] for q in ctx.captured_queries if ATTEMPT_TABLE in q["sql"]]
    assert len(inserts) == 1 and inserts[0].startswith("INSERT")
    assert DeliveryAttempt.objects.count() == 5


# --- the fence lost some rows ------------------------------------------------------------------


def _during_request(monkeypatch, action: Callable[[], None]) -> None:
    """Run ``action`` while the request is in flight (after the claim, before the outcome)."""
    real = transport.post_batch

    def post_batch(*args: Any, **kwargs: Any) -> transport.Response:
        response = real(*args, **kwargs)
        action()
        return response

    monkeypatch.setattr(transport, "post_batch", post_batch)


def test_a_message_erased_in_flight_gets_no_attempt_and_the_others_do(
    transactional_db, configure, data_plane, monkeypatch
):
    rows = make_messages(3, users=3)
    data_plane.status_sequence.append(503)
    _during_request(monkeypatch, lambda: Message.objects.filter(pk=rows[1].pk).delete())
    assert drain().retrying == 2
    assert sorted(a.message_id for a in _attempts()) == [rows[0].pk, rows[2].pk]


def test_a_late_worker_changes_no_row_but_its_request_is_recorded(
    transactional_db, configure, data_plane, monkeypatch
):
    rows = make_messages(2)

    def reclaimed() -> None:  # the lease ran out and another worker claimed one row
        Message.objects.filter(pk=rows[0].pk).update(locked_by="other:1:abcd", attempts=2)

    data_plane.status_sequence.append(503)
    _during_request(monkeypatch, reclaimed)
    assert drain().retrying == 1
    taken = Message.objects.get(pk=rows[0].pk)
    assert (taken.locked_by, taken.attempts, taken.last_response_code) == (
        "other:1:abcd",
        2,
        None,
    )
    assert [(a.message_id, a.number) for a in _attempts()] == [(rows[0].pk, 1), (rows[1].pk, 1)]


# --- purge and erasure -------------------------------------------------------------------------


def _with_attempts(messages: list[Message], n: int = 2) -> None:
    DeliveryAttempt.objects.bulk_create(
        DeliveryAttempt(message=m, number=i + 1, outcome="retry", response_code=503)
        for m in messages
        for i in range(n)
    )


def _purge(*args: str) -> str:
    out = io.StringIO()
    call_command("cdp_purge", *args, stdout=out)
    return out.getvalue()


def test_purge_deletes_the_attempts_of_purged_messages_in_batches(transactional_db):
    old = timezone.now() - datetime.timedelta(days=40)
    sent = make_messages(7)
    failed = make_messages(2)
    Message.objects.filter(pk__in=[m.pk for m in sent]).update(status="sent", created_at=old)
    Message.objects.filter(pk__in=[m.pk for m in failed]).update(status="failed", created_at=old)
    _with_attempts(sent + failed)

    out = _purge("--older-than", "30", "--batch-size", "3")

    assert "Deleted 7 sent, skipped or superseded message(s)" in out and "in 3 batch(es)" in out
    assert statuses() == {"failed": 2}
    assert sorted(set(DeliveryAttempt.objects.values_list("message_id", flat=True))) == sorted(
        m.pk for m in failed
    )


def test_erasure_deletes_the_attempts_of_the_user(transactional_db):
    rows = make_messages(4, users=2)  # userIds 1, 2, 1, 2
    _with_attempts(rows)
    out = _purge("--user-id", "1")
    assert "deleted 2 message(s)" in out
    assert set(Message.objects.values_list("user_id", flat=True)) == {"2"}
    assert set(DeliveryAttempt.objects.values_list("message__user_id", flat=True)) == {"2"}
    assert DeliveryAttempt.objects.count() == 4
