"""Delivery: drain the outbox to the data plane, safely with any number of workers.

The cycle, repeated by :func:`drain` until nothing is due or the time budget is
spent:

1. **Claim** (one short transaction): pick due ``pending`` rows, oldest first,
   with ``SELECT ... FOR UPDATE SKIP LOCKED`` where the backend has it, and move
   them out of the due set by setting ``next_attempt_at`` and ``locked_until`` to
   now + lease and ``locked_by`` to this claim's token, counting the attempt
   now (so a message that kills its worker still runs out of attempts). The
   row locks end with that transaction; ownership is the lease in the row.
   Backends without SKIP LOCKED (SQLite) claim with a conditional ``UPDATE``
   and are documented as single-worker.
2. **Send** outside any transaction: one ``/v1/batch`` POST per claimed batch.
   Right before each request the rows are re-read by id (still there, still
   this claim's), so a message erased meanwhile is left out; and the request
   must end before the lease does (its deadline is cut to what is left of it),
   so once a lease has passed no request carrying its rows is still running.
3. **Write back, fenced**: every outcome is written only where ``id``,
   ``locked_by``, ``attempts`` and ``status`` still match the claim, and clears
   the lease. A worker whose lease expired (and whose rows another worker may
   have claimed since) updates nothing. A worker that dies leaves rows that
   become due again when their lease ends. A failed request also leaves one
   :class:`~django_cdp.models.DeliveryAttempt` row per message, written in the
   same transaction (one ``INSERT``); a successful one writes nothing more.

All times come from the database clock (``Now()``), so workers on hosts with
skewed clocks agree on what is due.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from django.apps import apps
from django.db import connections, transaction
from django.db.models import F, Q
from django.db.models.functions import Now

from django_cdp import transport
from django_cdp.capture.rows import build_row
from django_cdp.models import DeliveryAttempt, Message, TraitsDigest
from django_cdp.settings import cdp_settings
from django_cdp.signals import message_created, message_failed, message_sent
from django_cdp.transport import Outcome
from django_cdp.validation import TrackingPlanViolation

logger = logging.getLogger("django_cdp.delivery")

PENDING = Message.Status.PENDING

BACKOFF_FACTOR = 3.0
BACKOFF_JITTER = 0.25
MAX_CONFIG_ERROR_RETRY_SECONDS = 60.0


def backoff_seconds(attempts: int, retry_after: float | None = None) -> float:
    """Delay before the next try of a message that has had ``attempts`` tries.

    Exponential (base x 3^(attempts-1), capped) with +-25 % jitter so that rows
    that failed together do not all come back in the same second; never earlier
    than a ``Retry-After`` the data plane asked for (itself capped, so a bogus
    header cannot park a message for weeks).
    """
    base = float(cdp_settings.RETRY_BACKOFF_BASE)
    cap = float(cdp_settings.RETRY_BACKOFF_MAX)
    delay = min(cap, base * BACKOFF_FACTOR ** max(0, attempts - 1))
    delay *= random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def config_error_delay() -> float:
    """Delay after 401/403/404: short, so that a fixed key or URL takes effect quickly."""
    return min(MAX_CONFIG_ERROR_RETRY_SECONDS, float(cdp_settings.CONFIG_ERROR_RETRY_SECONDS))


@dataclass
class DrainResult:
    """What one :func:`drain` did, in messages (``requests`` counts HTTP requests)."""

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    #: Put back with a backoff after 429/5xx/timeouts/connection errors.
    retrying: int = 0
    #: Put back after 401/403/404 (attempt not counted).
    config_errors: int = 0
    skipped: int = 0
    #: Given back unsent because the lease was running out.
    released: int = 0
    requests: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return ", ".join(f"{key} {value}" for key, value in self.as_dict().items())


class Claimed(NamedTuple):
    """A claimed row, as much as sending and fencing need."""

    id: int
    message_id: str
    type: str
    user_id: str
    payload: str
    #: ``attempts`` after the claim counted this one: part of the fence.
    attempts: int


class Batch(NamedTuple):
    rows: list[Claimed]
    #: Whether more rows may be due (the claim was cut by a limit).
    more: bool


def default_worker_id() -> str:
    """``host:pid``, the readable part of ``Message.locked_by``."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}"


@contextmanager
def _bookkeeping(using: str) -> Iterator[None]:
    """A transaction for delivery's own writes (claims and outcomes).

    On PostgreSQL its commit does not wait for the WAL flush (``synchronous_commit
    = off`` for this transaction only): if the database server crashed right after,
    a lost claim makes rows due again and a lost outcome lets the lease expire and
    the rows be sent again with the same messageId, both within the at-least-once
    promise, and the saved flush is a large share of a claim's cost.
    """
    with transaction.atomic(using=using):
        connection = connections[using]
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield


def claim(
    using: str,
    token: str,
    *,
    max_messages: int,
    max_bytes: int,
    lease_seconds: float,
) -> Batch:
    """Claim up to ``max_messages`` due rows whose wire size fits in ``max_bytes``.

    A single row larger than ``max_bytes`` is still claimed (alone), so that the
    size check at send time can dead-letter it instead of it blocking the queue.
    """
    skip_locked = connections[using].features.has_select_for_update_skip_locked
    budget = max_bytes - transport.ENVELOPE_BYTES
    with _bookkeeping(using):
        due = Message.objects.using(using).filter(status=PENDING, next_attempt_at__lte=Now())
        if skip_locked:
            due = due.select_for_update(skip_locked=True)
        candidates = list(
            due.order_by("next_attempt_at", "id").values_list(
                "id",
                "message_id",
                "type",
                "user_id",
                "payload",
                "attempts",
                "xid",
                "source_model",
                "source_pk",
            )[:max_messages]
        )
        taken: list[tuple] = []
        size = 0
        for row in candidates:
            size += transport.wire_size(row[4])
            if taken and size > budget:
                break
            taken.append(row)
        if not taken:
            return Batch([], False)
        ids = [row[0] for row in taken]
        lease = Now() + timedelta(seconds=lease_seconds)
        # On PostgreSQL the rows are locked, so the conditions hold; on SQLite they
        # are what makes the claim safe against a concurrent claimer. A row written by
        # a capture trigger is finished now: its transaction is over (xid, capture).
        updated = (
            Message.objects.using(using)
            .filter(id__in=ids, status=PENDING, next_attempt_at__lte=Now())
            .update(
                attempts=F("attempts") + 1,
                locked_by=token,
                locked_until=lease,
                next_attempt_at=lease,
                last_attempt_at=Now(),
                xid=None,
                capture=None,
            )
        )
        attempts = {row[0]: row[5] + 1 for row in taken}
        if updated != len(ids):
            attempts = dict(
                Message.objects.using(using)
                .filter(id__in=ids, locked_by=token, status=PENDING)
                .values_list("id", "attempts")
            )
        rows = [
            Claimed(r[0], r[1], r[2], r[3], r[4], attempts[r[0]]) for r in taken if r[0] in attempts
        ]
        fresh = {r[0]: (r[7], r[8]) for r in taken if r[6] is not None}
        if fresh:
            rows = _finish(using, rows, fresh)
    return Batch(rows, more=len(taken) < len(candidates) or len(candidates) == max_messages)


def _finish(using: str, rows: list[Claimed], fresh: dict[int, tuple[str, str]]) -> list[Claimed]:
    """Python's part of the messages a capture trigger wrote, once, when they are claimed.

    A trigger cannot run Python: the ``ENRICH_MESSAGE`` hook, tracking-plan
    validation (``flag``, ``block``) and the ``message_created`` signal run here
    instead, through the one row builder (:func:`~django_cdp.capture.rows.build_row`).
    A message that is blocked, or fails (the hook raised), is written with its
    status and leaves the batch; one the hook changed is written with its new text.
    The claim cleared ``xid``, so a retry does not run them again.
    """
    hook = cdp_settings.ENRICH_MESSAGE
    listeners = message_created.has_listeners(Message)
    if hook is None and cdp_settings.VALIDATION == "off" and not listeners:
        return rows
    kept = []
    for row in rows:
        if row.id not in fresh:
            kept.append(row)
            continue
        built = finish_row(row.payload, *fresh[row.id])
        if built.payload != row.payload or built.status != PENDING or built.violations:
            changes: dict[str, Any] = {
                "payload": built.payload,
                "status": built.status,
                "last_error": built.last_error,
                "violations": built.violations,
            }
            if built.status != PENDING:
                changes.update(_CLEAR_LEASE, attempts=F("attempts") - 1)
            Message.objects.using(using).filter(id=row.id).update(**changes)
        if listeners:
            built.pk = row.id
            for receiver, result in message_created.send_robust(sender=Message, message=built):
                if isinstance(result, Exception):
                    logger.error(
                        "django-cdp: a message_created receiver %r raised %r", receiver, result
                    )
        if built.status == PENDING:
            kept.append(row._replace(payload=built.payload))
    return kept


def finish_row(payload: str, source_model: str, source_pk: str) -> Message:
    """The row of a trigger-written message after its Python part (enrichment, validation)."""
    model = apps.get_model(source_model) if source_model else Message
    pk = model._meta.pk.to_python(source_pk)  # "5" -> 5, as the reason names it
    message = json.loads(payload, parse_float=Decimal)
    minimal = {k: v for k, v in message.items() if k not in ("properties", "traits")}
    minimal["context"] = {k: v for k, v in message.get("context", {}).items() if k != "traits"}
    try:
        return build_row(lambda: message, minimal, instance=None, source=(model, pk))
    except TrackingPlanViolation as exc:  # "raise" cannot raise into a write that is over
        return build_row(
            lambda: message, minimal, instance=None, source=(model, pk), error=str(exc)
        )


def _fenced(using: str, token: str, rows: Sequence[Claimed]) -> Any:
    """The rows still owned by this claim: same id, token, attempts and status."""
    by_attempts: dict[int, list[int]] = {}
    for row in rows:
        by_attempts.setdefault(row.attempts, []).append(row.id)
    match = Q()
    for attempts, ids in by_attempts.items():
        match |= Q(attempts=attempts, id__in=ids)
    return Message.objects.using(using).filter(match, locked_by=token, status=PENDING)


_CLEAR_LEASE = {"locked_until": None, "locked_by": ""}

AttemptOutcome = DeliveryAttempt.Outcome


class FailedAttempt(NamedTuple):
    """What a failed request left to record on each of its messages."""

    outcome: str
    response: transport.Response


def _attempt_rows(
    token: str, rows: Iterable[Claimed], attempt: FailedAttempt
) -> list[DeliveryAttempt]:
    """One unsaved attempt per row. The response text is already masked by the transport."""
    resp = attempt.response
    if resp.status is None:
        excerpt, error = "", resp.text
    else:
        excerpt, error = resp.text[: DeliveryAttempt.EXCERPT_CHARS], ""
    return [
        DeliveryAttempt(
            message_id=row.id,
            number=row.attempts,
            outcome=attempt.outcome,
            response_code=resp.status,
            response_excerpt=excerpt,
            error=error,
            duration_ms=resp.duration_ms,
            worker=token,
        )
        for row in rows
    ]


def _notify(signal: Any, using: str, ids: Iterable[int]) -> None:
    if not signal.has_listeners(Message):
        return
    for message in Message.objects.using(using).filter(id__in=list(ids)).order_by("id"):
        try:
            signal.send(sender=Message, message=message)
        except Exception:  # a user's receiver must not break delivery
            logger.exception("django-cdp: a %r receiver raised", signal)


class _Run:
    """One drain: the settings snapshot, the claim token and the counts."""

    def __init__(self, using: str, worker_id: str | None) -> None:
        self.using = using
        self.worker_id = (worker_id or default_worker_id())[:80]
        self.result = DrainResult()
        self.write_key: str = cdp_settings.WRITE_KEY or ""
        self.url: str = cdp_settings.DATA_PLANE_URL or ""
        self.lease = float(cdp_settings.LEASE_SECONDS)
        self.request_seconds = float(cdp_settings.CONNECT_TIMEOUT) + float(
            cdp_settings.READ_TIMEOUT
        )
        self.max_attempts = int(cdp_settings.MAX_ATTEMPTS)
        self.max_message_bytes = int(cdp_settings.MAX_MESSAGE_BYTES)
        self.max_batch_bytes = int(cdp_settings.MAX_BATCH_BYTES)

    def new_token(self) -> str:
        return f"{self.worker_id}:{secrets.token_hex(4)}"

    def write(
        self,
        token: str,
        rows: Sequence[Claimed],
        attempt: FailedAttempt | None = None,
        **fields: Any,
    ) -> int:
        """Record an outcome on the rows this claim still owns, and end their lease.

        With ``attempt`` (a failed request), the attempt is recorded for the rows in
        the same transaction: one ``bulk_create``, so a failure costs one statement
        more and a success none.
        """
        with _bookkeeping(self.using):
            n = _fenced(self.using, token, rows).update(**fields, **_CLEAR_LEASE)
            if attempt is not None:
                self.record_attempts(token, rows, attempt, n)
            return n

    def record_attempts(
        self, token: str, rows: Sequence[Claimed], attempt: FailedAttempt, updated: int
    ) -> None:
        """Add the attempt rows; call inside the outcome's transaction, after its UPDATE.

        When the fence matched every row (the normal case) the UPDATE holds their row
        locks, so they cannot vanish before the commit. Otherwise some rows were
        erased or purged meanwhile, or this claim's lease ran out: the request still
        happened, so it is recorded on the messages that still exist, locked first so
        that a concurrent delete cannot break the commit with a foreign-key error.
        """
        if updated != len(rows):
            existing = set(
                Message.objects.using(self.using)
                .filter(id__in=[r.id for r in rows])
                .select_for_update()
                .values_list("id", flat=True)
            )
            rows = [r for r in rows if r.id in existing]
        if rows:
            DeliveryAttempt.objects.using(self.using).bulk_create(
                _attempt_rows(token, rows, attempt)
            )

    # Outcomes. Each is one fenced UPDATE (per attempts value) and clears the lease.

    def mark_sent(self, token: str, rows: Sequence[Claimed], status: int) -> None:
        n = self.write(
            token,
            rows,
            status=Message.Status.SENT,
            sent_at=Now(),
            last_response_code=status,
            last_error="",
        )
        self.result.sent += n
        _notify(message_sent, self.using, (r.id for r in rows))

    def mark_failed(
        self,
        token: str,
        rows: Sequence[Claimed],
        error: str,
        status: int | None,
        attempt: FailedAttempt | None = None,
    ) -> None:
        """Dead-letter ``rows``; their identify traits will be sent again later.

        ``attempt`` is the failed request, when there was one (an unsendable message
        fails without a request, so it has no attempt row: its reason is ``last_error``).
        """
        identifies = [r for r in rows if r.type == Message.Type.IDENTIFY]
        with _bookkeeping(self.using):
            n = self.write(
                token,
                rows,
                attempt,
                status=Message.Status.FAILED,
                last_error=error,
                last_response_code=status,
            )
            if identifies:
                TraitsDigest.objects.using(self.using).forget_identifies(
                    [(r.user_id, r.message_id) for r in identifies]
                )
        self.result.failed += n
        logger.warning("django-cdp: %d message(s) failed for good: %s", n, error[:300])
        _notify(message_failed, self.using, (r.id for r in rows))

    def mark_retry(self, token: str, rows: Sequence[Claimed], resp: transport.Response) -> None:
        """Back off (429/5xx/network), or dead-letter the rows that are out of attempts."""
        error = resp.describe()
        exhausted = [r for r in rows if r.attempts >= self.max_attempts]
        if exhausted:
            self.mark_failed(
                token,
                exhausted,
                f"gave up after {self.max_attempts} attempts: {error}",
                resp.status,
                FailedAttempt(AttemptOutcome.DEAD_LETTER, resp),
            )
        by_attempts: dict[int, list[Claimed]] = {}
        for r in rows:
            if r.attempts < self.max_attempts:
                by_attempts.setdefault(r.attempts, []).append(r)
        retry = FailedAttempt(AttemptOutcome.RETRY, resp)
        for attempts, group in by_attempts.items():
            delay = backoff_seconds(attempts, resp.retry_after)
            self.result.retrying += self.write(
                token,
                group,
                retry,
                next_attempt_at=Now() + timedelta(seconds=delay),
                last_error=error,
                last_response_code=resp.status,
            )
        logger.warning(
            "django-cdp: data plane did not take %d message(s), retrying later: %s",
            len(rows),
            error,
        )

    def mark_config_error(
        self, token: str, rows: Sequence[Claimed], resp: transport.Response
    ) -> None:
        """3xx/401/403/404: keep the rows pending, give the attempt back, retry soon, be loud."""
        error = resp.describe()
        self.result.config_errors += self.write(
            token,
            rows,
            FailedAttempt(AttemptOutcome.CONFIG_ERROR, resp),
            attempts=F("attempts") - 1,
            next_attempt_at=Now() + timedelta(seconds=config_error_delay()),
            last_error=error,
            last_response_code=resp.status,
        )
        logger.error(
            "django-cdp: the data plane at %s refused the write key or URL, or redirected (%s); "
            "%d message(s) stay pending until DJANGO_CDP['WRITE_KEY'] / "
            "['DATA_PLANE_URL'] are fixed",
            self.url,
            error,
            len(rows),
        )

    def release(self, token: str, rows: Sequence[Claimed]) -> None:
        """Give unsent rows back at once, attempt refunded (the lease ran short)."""
        self.result.released += self.write(
            token, rows, attempts=F("attempts") - 1, next_attempt_at=Now()
        )

    def mark_skipped(self, token: str, rows: Sequence[Claimed]) -> None:
        self.result.skipped += self.write(
            token, rows, status=Message.Status.SKIPPED, attempts=F("attempts") - 1
        )

    # Sending.

    def unsendable(self, row: Claimed) -> str | None:
        """Why ``row`` can never be sent, or ``None``. Re-checked at send time."""
        if not transport.is_spliceable(row.payload):
            return "payload is not a JSON object"
        size = transport.wire_size(row.payload) - transport.PER_MESSAGE_OVERHEAD
        limit = min(
            self.max_message_bytes,
            self.max_batch_bytes - transport.ENVELOPE_BYTES - transport.PER_MESSAGE_OVERHEAD,
        )
        if size > limit:
            return f"message is {size} bytes, more than the limit of {limit} bytes"
        return None

    def still_ours(self, token: str, rows: list[Claimed]) -> list[Claimed]:
        """``rows`` that still exist and are still this claim's (one query by id).

        Called right before each request: a message erased (or deleted in the admin)
        since the claim is left out of the body instead of being sent after its erasure.
        """
        kept = set(_fenced(self.using, token, rows).order_by().values_list("id", flat=True))
        return [r for r in rows if r.id in kept]

    def send(self, token: str, rows: list[Claimed], claimed_at: float) -> bool:
        """Send one claimed batch; split it on 400/413. False means: stop draining."""
        sendable = []
        for row in rows:
            why = self.unsendable(row)
            if why:
                self.mark_failed(token, [row], why, None)
            else:
                sendable.append(row)
        work: deque[list[Claimed]] = deque([sendable] if sendable else [])
        while work:
            part = work.popleft()
            if time.monotonic() - claimed_at > self.lease / 2:
                # Another worker may claim these rows once the lease ends; stop before that.
                self.release(token, [r for p in (part, *work) for r in p])
                return True
            part = self.still_ours(token, part)
            if not part:
                continue
            # The lease ends no earlier than claimed_at + lease (the claim started after
            # claimed_at); cutting the request there means it never outlives the lease,
            # which is what erasure (and another worker's claim) rely on.
            lease_left = claimed_at + self.lease - time.monotonic()
            resp = transport.post_batch(
                [r.payload for r in part],
                write_key=self.write_key,
                data_plane_url=self.url,
                use_gzip=bool(cdp_settings.GZIP),
                connect_timeout=float(cdp_settings.CONNECT_TIMEOUT),
                read_timeout=float(cdp_settings.READ_TIMEOUT),
                total_timeout=min(self.request_seconds, lease_left),
            )
            self.result.requests += 1
            outcome = resp.outcome
            if outcome is Outcome.SENT:
                self.mark_sent(token, part, resp.status or 200)
            elif outcome is Outcome.REFUSED:
                if len(part) == 1:
                    self.mark_failed(
                        token,
                        part,
                        resp.describe(),
                        resp.status,
                        FailedAttempt(AttemptOutcome.REFUSED, resp),
                    )
                else:
                    # The data plane refuses a whole request for one bad message:
                    # bisect until the refused ones are alone. These halving requests
                    # record no attempt: the good messages in them were not refused.
                    middle = len(part) // 2
                    work.extendleft([part[middle:], part[:middle]])
            else:
                rest = [r for p in (part, *work) for r in p]
                if outcome is Outcome.CONFIG:
                    self.mark_config_error(token, rest, resp)
                else:
                    self.mark_retry(token, rest, resp)
                return False
        return True


def drain(
    *, using: str = "default", time_budget: float | None = None, worker_id: str | None = None
) -> DrainResult:
    """Deliver due messages in batches until none is due or ``time_budget`` seconds pass.

    Safe to run concurrently (on PostgreSQL) from any number of processes; the
    claim makes sure each message is in one worker's hands at a time. Must be
    called outside a transaction so that claims and outcomes commit at once.
    With ``SEND = False`` claimed messages become ``skipped``; without a write key
    or data plane URL nothing is claimed and messages wait as ``pending``.
    """
    run = _Run(using, worker_id)
    send = bool(cdp_settings.SEND)
    if send and not (run.write_key and run.url):
        logger.debug("django-cdp: WRITE_KEY or DATA_PLANE_URL is empty; nothing is sent")
        return run.result
    started = time.monotonic()
    max_messages = max(1, int(cdp_settings.MAX_BATCH_MESSAGES))
    limit = max_messages
    while True:
        token = run.new_token()
        claimed_at = time.monotonic()
        batch = claim(
            using,
            token,
            max_messages=limit,
            max_bytes=run.max_batch_bytes,
            lease_seconds=run.lease,
        )
        if not batch.rows:
            break
        run.result.claimed += len(batch.rows)
        # Fetch only about as many rows as fit next time (payloads can be large).
        limit = min(max_messages, max(len(batch.rows) * 5 // 4 + 1, 10))
        if not send:
            run.mark_skipped(token, batch.rows)
        elif not run.send(token, batch.rows, claimed_at):
            break
        if not batch.more:
            break
        if time_budget is not None and time.monotonic() - started >= time_budget:
            break
    return run.result
