"""Delivery: drain the outbox to the data plane, safely with any number of workers.

The cycle, repeated by :func:`drain` until nothing is due or the time budget is
spent:

1. **Claim** (one short transaction): pick due ``pending`` rows, oldest first,
   with ``SELECT ... FOR UPDATE SKIP LOCKED`` where the backend has it, and lease
   them: ``locked_until`` = now + lease and ``locked_by`` = this claim's token
   (a leased row is not due), counting the attempt
   now (so a message that kills its worker still runs out of attempts). The
   row locks end with that transaction; ownership is the lease in the row.
   Identifies are resolved here too: only a user's newest identify is sent, the
   older pending ones become ``superseded``, and the newest waits while an older
   one is still in flight (:func:`_latest_identifies`).
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
   :class:`~django_cdp.models.DeliveryAttempt` row per message, and a final
   outcome adds to the hourly :class:`~django_cdp.models.DeliveryCount`, both in
   the same transaction.

Outages belong to the data plane, not to the messages: a 5xx, 429, timeout or
connection error marks the data plane's :class:`~django_cdp.models.DeliveryEndpoint`
row as failing, and every worker then waits for its backoff; one worker at a time
probes with a small batch whose attempts are given back, and the first answer
makes the whole backlog flow again at full speed (:meth:`_Run.endpoint_turn`).

All times come from the database clock (``Now()``), so workers on hosts with
skewed clocks agree on what is due.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any, NamedTuple

from django.apps import apps
from django.db import connections, transaction
from django.db.models import BooleanField, CharField, ExpressionWrapper, F, Func, Lookup, Q
from django.db.models.functions import Cast, Now, TruncHour

from django_cdp import transport, validation
from django_cdp.capture import deferred
from django_cdp.capture.rows import build_row
from django_cdp.models import (
    DeliveryAttempt,
    DeliveryCount,
    DeliveryEndpoint,
    Message,
    TraitsDigest,
)
from django_cdp.settings import cdp_settings
from django_cdp.signals import message_created, message_failed, message_sent
from django_cdp.transport import Outcome
from django_cdp.validation import TrackingPlanViolation

logger = logging.getLogger("django_cdp.delivery")

PENDING = Message.Status.PENDING
IDENTIFY = Message.Type.IDENTIFY

BACKOFF_FACTOR = 3.0
BACKOFF_JITTER = 0.25
MAX_CONFIG_ERROR_RETRY_SECONDS = 60.0
#: Messages in a probe, the one small request sent while the data plane is failing.
PROBE_MESSAGES = 10
#: The data plane's backoff: doubling from this (or ``RETRY_BACKOFF_BASE`` if smaller)...
OUTAGE_BACKOFF_BASE = 1.0
#: ...up to this (or ``RETRY_BACKOFF_MAX`` if smaller): the longest a recovered data plane
#: waits for its first probe, so this bounds how late the backlog starts flowing again.
OUTAGE_BACKOFF_MAX = 20.0
#: How long a user's newest identify waits while an older one of that user is in flight.
IDENTIFY_WAIT_SECONDS = 1.0
#: A drain whose data plane answered this recently claims without reading the data
#: plane's row first: its own last request is fresher news than another worker's.
ENDPOINT_RECHECK_SECONDS = 1.0
SUPERSEDED_ERROR = "superseded: a newer identify of this user is delivered instead"

_CLEAR_LEASE = {"locked_until": None, "locked_by": ""}


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


def outage_seconds(failures: int, retry_after: float | None = None) -> float:
    """Delay before the next probe of a data plane that failed ``failures`` requests in a row.

    Short and capped (1, 2, 4 ... 20 s), because every second of it after the
    data plane recovers is a second the whole backlog waits; jittered down to half,
    so that deployments sharing a data plane do not probe in step; never earlier
    than a ``Retry-After`` (capped like a message's).
    """
    base = min(OUTAGE_BACKOFF_BASE, float(cdp_settings.RETRY_BACKOFF_BASE))
    cap = min(OUTAGE_BACKOFF_MAX, float(cdp_settings.RETRY_BACKOFF_MAX))
    delay = min(cap, base * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, float(cdp_settings.RETRY_BACKOFF_MAX)))
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
    #: Put back after 429/5xx/timeouts/connection errors.
    retrying: int = 0
    #: Put back after 401/403/404 (attempt not counted).
    config_errors: int = 0
    skipped: int = 0
    #: Older identifies of a user left unsent because a newer one is delivered.
    superseded: int = 0
    #: Given back unsent because the lease was running out.
    released: int = 0
    requests: int = 0
    #: 1 when the drain stopped (or did not start) because the data plane is backing off.
    waiting: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return ", ".join(f"{key} {value}" for key, value in self.as_dict().items())


class Claimed(NamedTuple):
    """A claimed row, as much as sending, fencing and counting need."""

    id: int
    message_id: str
    type: str
    user_id: str
    payload: str
    #: ``attempts`` after the claim counted this one: part of the fence.
    attempts: int
    #: The hour the message was written in: its bucket in the hourly counters.
    hour: datetime


class Batch(NamedTuple):
    rows: list[Claimed]
    #: Whether more rows may be due (the claim was cut by a limit).
    more: bool
    #: Older identifies this claim marked ``superseded`` instead of claiming them.
    superseded: int = 0


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


def _count(using: str, status: str, rows: Iterable[Any]) -> None:
    """Add rows that reached ``status`` to the hourly counters (call in their transaction)."""
    if status not in DeliveryCount.STATUSES:
        return
    DeliveryCount.objects.using(using).add(
        {(hour, status): n for hour, n in Counter(r.hour for r in rows).items()}
    )


#: Due rows: pending, their time has come, and not leased (or the lease ran out). The
#: claim leaves ``next_attempt_at`` alone and writes only columns no index holds, so
#: PostgreSQL updates the row in place (HOT, with the table's free space per page:
#: ``fillfactor``) instead of adding an entry to every index of the table; a leased row
#: stays in the claim index, where the next claims step over it.
_DUE = Q(status=PENDING, next_attempt_at__lte=Now()) & (
    Q(locked_until__isnull=True) | Q(locked_until__lte=Now())
)

_CLAIM_COLUMNS = (
    "id",
    "message_id",
    "type",
    "user_id",
    "payload",
    "attempts",
    "fresh",
    "source_model",
    "source_pk",
    "hour",
)


#: Whether a row is a capture trigger's that no claim has taken yet (see :func:`_finish`).
_FRESH = ExpressionWrapper(Q(capture__isnull=False), output_field=BooleanField())

#: The hour a message was written in (its counters' bucket), as text: a few distinct
#: values per batch, parsed once each (:func:`_hour_of`) instead of a datetime per row.
_HOUR = Cast(TruncHour("created_at", tzinfo=dt_timezone.utc), CharField())


@functools.lru_cache(maxsize=64)
def _hour_of(text: str) -> datetime:
    """The UTC hour of :data:`_HOUR`'s text (``YYYY-MM-DD HH:00:00``, as both backends write it)."""
    return datetime.fromisoformat(text[:19]).replace(tzinfo=dt_timezone.utc)


class _IdIn(Lookup):
    """``id IN (ids)`` with the ids as one parameter.

    A batch names a thousand rows or more; as one placeholder each, the statement
    costs more to build and bind in Python than to run. PostgreSQL takes an array
    (``= ANY``), SQLite a JSON list (``json_each``).
    """

    lookup_name = "cdp_id_in"
    prepare_rhs = False

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, Any]:
        lhs, params = compiler.compile(self.lhs)
        ids = [int(i) for i in self.rhs]
        if connection.vendor == "postgresql":
            return f"{lhs} = ANY(%s)", (*params, ids)
        if connection.vendor == "sqlite":
            return f"{lhs} IN (SELECT value FROM json_each(%s))", (*params, json.dumps(ids))
        return f"{lhs} IN ({', '.join(['%s'] * len(ids)) or 'NULL'})", (*params, *ids)


def _ids(ids: Iterable[int]) -> _IdIn:
    """A filter: the message's id is one of ``ids``."""
    return _IdIn(F("id"), list(ids))


class _Candidate(NamedTuple):
    id: int
    message_id: str
    type: str
    user_id: str
    payload: str
    attempts: int
    #: Written by a capture trigger and not claimed before (``capture`` set): its
    #: Python part (:func:`_finish`) is still to run.
    fresh: bool
    source_model: str
    source_pk: str
    hour: datetime


def claim(
    using: str,
    token: str,
    *,
    max_messages: int,
    max_bytes: int,
    lease_seconds: float,
    probe: bool = False,
) -> Batch:
    """Claim up to ``max_messages`` due rows whose wire size fits in ``max_bytes``.

    A single row larger than ``max_bytes`` is still claimed (alone), so that the
    size check at send time can dead-letter it instead of it blocking the queue.
    A ``probe`` (the data plane is failing) takes the rows tried least recently
    first, so that a data plane which stores requests it never answers receives
    each message at most once more before the backlog has been round.
    """
    skip_locked = connections[using].features.has_select_for_update_skip_locked
    lease = (token, max_messages, max_bytes - transport.ENVELOPE_BYTES, lease_seconds, probe)
    with _bookkeeping(using):
        if connections[using].vendor == "postgresql":
            leased, more = _lease_in_one_statement(using, *lease)
        else:
            leased, more = _lease_conditionally(using, *lease)
        superseded = 0
        if any(row.type == IDENTIFY for row in leased):
            leased, superseded = _latest_identifies(using, token, leased, skip_locked)
        rows = [
            Claimed(r.id, r.message_id, r.type, r.user_id, r.payload, r.attempts, r.hour)
            for r in leased
        ]
        fresh = {r.id: (r.source_model, r.source_pk) for r in leased if r.fresh}
        if fresh:
            rows = _finish(using, rows, fresh)
    return Batch(rows, more, superseded)


def _due(using: str, probe: bool) -> Any:
    """The due rows in claim order: oldest due first; for a probe, least recently tried first."""
    order = (
        (F("last_attempt_at").asc(nulls_first=True), "id") if probe else ("next_attempt_at", "id")
    )
    return Message.objects.using(using).filter(_DUE).order_by(*order)


def _lease_fields(token: str, lease_seconds: float) -> dict[str, Any]:
    """What a claim writes on the rows it leases: the attempt, the lease, and ``capture``
    cleared (a row written by a capture trigger is finished now: its transaction is over).
    None of these columns is indexed, so the update is HOT where the page has room."""
    return {
        "attempts": F("attempts") + 1,
        "locked_by": token,
        "locked_until": Now() + timedelta(seconds=lease_seconds),
        "last_attempt_at": Now(),
        "capture": None,
    }


def _lease_in_one_statement(
    using: str, token: str, limit: int, budget: int, lease_seconds: float, probe: bool
) -> tuple[list[_Candidate], bool]:
    """PostgreSQL: pick, cut to the byte budget and lease in one ``UPDATE ... RETURNING``.

    The due rows are locked with ``SKIP LOCKED`` (another claim passes them over), a
    window sums their wire sizes in claim order, and the rows within the budget are
    leased; the ``RETURNING`` list gives back what sending needs, with the attempt
    count after this claim and whether ``capture`` was set before it. One statement instead of a
    ``SELECT`` and an ``UPDATE`` of a thousand ids.
    """
    connection = connections[using]
    due = _due(using, probe).values("id", "next_attempt_at", "last_attempt_at")
    due = due.annotate(fresh=_FRESH, hour=_HOUR, size=Func(F("payload"), function="OCTET_LENGTH"))
    select, select_params = (
        due.select_for_update(skip_locked=True)[:limit].query.get_compiler(using).as_sql()
    )
    window = "last_attempt_at ASC NULLS FIRST, id" if probe else "next_attempt_at, id"
    table = connection.ops.quote_name(Message._meta.db_table)
    sql = (
        f"WITH candidates AS ({select}), "
        f"budget AS (SELECT id, fresh, hour, row_number() OVER w AS position, "
        "count(*) OVER () AS found, "
        f"sum(size + %s) OVER w AS running FROM candidates WINDOW w AS (ORDER BY {window})) "
        # The columns _lease_fields() writes on other backends.
        f"UPDATE {table} SET attempts = {table}.attempts + 1, locked_by = %s, "
        f"locked_until = STATEMENT_TIMESTAMP() + %s * INTERVAL '1 second', "
        f"last_attempt_at = STATEMENT_TIMESTAMP(), capture = NULL FROM budget "
        f"WHERE {table}.id = budget.id AND (budget.position = 1 OR budget.running <= %s) "
        f"RETURNING budget.position, budget.found, {table}.id, {table}.message_id, "
        f"{table}.type, {table}.user_id, {table}.payload, {table}.attempts, budget.fresh, "
        f"{table}.source_model, {table}.source_pk, budget.hour"
    )
    params = [*select_params, transport.PER_MESSAGE_OVERHEAD, token, lease_seconds, budget]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        returned = sorted(cursor.fetchall())
    leased = [_Candidate._make((*row[2:-1], _hour_of(row[-1]))) for row in returned]
    found = returned[0][1] if returned else 0
    return leased, found == limit or len(leased) < found


def _lease_conditionally(
    using: str, token: str, limit: int, budget: int, lease_seconds: float, probe: bool
) -> tuple[list[_Candidate], bool]:
    """Other backends: read the due rows, then lease those still due (a conditional ``UPDATE``).

    The condition is what makes the claim safe against a concurrent claimer where
    rows cannot be locked (SQLite: documented as single-worker).
    """
    skip_locked = connections[using].features.has_select_for_update_skip_locked
    due = _due(using, probe)
    if skip_locked:
        due = due.select_for_update(skip_locked=True)
    candidates = [
        _Candidate._make((*row[:-1], _hour_of(row[-1])))
        for row in due.annotate(fresh=_FRESH, hour=_HOUR).values_list(*_CLAIM_COLUMNS)[:limit]
    ]
    taken: list[_Candidate] = []
    size = 0
    for row in candidates:
        size += transport.wire_size(row.payload)
        if taken and size > budget:
            break
        taken.append(row)
    more = len(taken) < len(candidates) or len(candidates) == limit
    if not taken:
        return [], more
    ids = [row.id for row in taken]
    messages = Message.objects.using(using)
    updated = messages.filter(_DUE, _ids(ids)).update(**_lease_fields(token, lease_seconds))
    attempts = {row.id: row.attempts + 1 for row in taken}
    if updated != len(ids):
        attempts = dict(
            messages.filter(_ids(ids), locked_by=token, status=PENDING).values_list(
                "id", "attempts"
            )
        )
    return [r._replace(attempts=attempts[r.id]) for r in taken if r.id in attempts], more


def _latest_identifies(
    using: str, token: str, taken: list[_Candidate], skip_locked: bool
) -> tuple[list[_Candidate], int]:
    """``taken`` without the identifies that must not be sent now, and how many were superseded.

    Runs inside the claim's transaction, after ``taken`` was leased to ``token``; the
    rows it drops from ``taken`` get their lease and attempt back.
    Only a user's newest identify (highest id among its pending and sent ones) is
    ever sent, and never while an older one of that user is in flight (leased, or
    locked by another claim that may lease it): otherwise the older traits could
    reach the data plane after the newer ones. So, per user of an identify in
    ``taken``:

    * older pending identifies that this claim holds or can lock (``SKIP LOCKED``)
      and that are not leased become ``superseded``; a claim that holds an older
      one while the newest exists supersedes it (the newest being committed, every
      claimer sees it, whatever it locks);
    * the newest, if taken here, is claimed unless an older one is in flight; then
      it waits :data:`IDENTIFY_WAIT_SECONDS` (out of the due set, so a drain does
      not spin on it) and is claimed once the older one has an outcome, which, if
      it is a retry, makes the older one superseded at that claim.
    """
    mine = {row.id: row for row in taken if row.type == IDENTIFY}
    users = {row.user_id for row in mine.values()}
    messages = Message.objects.using(using)
    leased = ExpressionWrapper(Q(locked_until__gt=Now()), output_field=BooleanField())
    others = list(
        messages.filter(type=IDENTIFY, user_id__in=users)
        .filter(Q(status=PENDING) | Q(status=Message.Status.SENT, id__gt=min(mine)))
        .exclude(id__in=list(mine))
        .annotate(leased=leased, hour=_HOUR)
        .values_list("id", "user_id", "status", "leased", "hour")
    )
    newest: dict[str, int] = {}
    for id_, user_id, *_ in [(r.id, r.user_id) for r in mine.values()] + others:
        newest[user_id] = max(id_, newest.get(user_id, 0))
    older = [r for r in others if r[2] == PENDING and r[0] < newest[r[1]]]
    lockable = {r[0] for r in older}
    if skip_locked and lockable:
        lockable = set(
            messages.filter(id__in=list(lockable), status=PENDING)
            .select_for_update(skip_locked=True)
            .values_list("id", flat=True)
        )
    in_flight = {r[1] for r in older if r[3] or r[0] not in lockable}
    theirs = [
        _Candidate(r[0], "", IDENTIFY, r[1], "", 0, False, "", "", _hour_of(r[4]))
        for r in older
        if r[0] in lockable and not r[3]
    ]
    ours = [r for r in mine.values() if r.id < newest[r.user_id]]
    waiting = [r.id for r in mine.values() if r.id == newest[r.user_id] and r.user_id in in_flight]
    supersede = {
        "status": Message.Status.SUPERSEDED,
        "last_error": SUPERSEDED_ERROR,
        "capture": None,
        **_CLEAR_LEASE,
    }
    if theirs:
        messages.filter(id__in=[r.id for r in theirs], status=PENDING).update(**supersede)
    refund = {"attempts": F("attempts") - 1}
    if ours:
        messages.filter(id__in=[r.id for r in ours], locked_by=token).update(**supersede, **refund)
    superseded = theirs + ours
    _count(using, Message.Status.SUPERSEDED, superseded)
    if waiting:
        messages.filter(id__in=waiting, locked_by=token).update(
            next_attempt_at=Now() + timedelta(seconds=IDENTIFY_WAIT_SECONDS),
            **refund,
            **_CLEAR_LEASE,
        )
    dropped = {r.id for r in superseded}.union(waiting)
    return [row for row in taken if row.id not in dropped], len(superseded)


def _finish(using: str, rows: list[Claimed], fresh: dict[int, tuple[str, str]]) -> list[Claimed]:
    """Python's part of the messages a capture trigger wrote, once, when they are claimed.

    A trigger cannot run Python: the ``ENRICH_MESSAGE`` hook, tracking-plan
    validation (``flag``, ``block``) and the ``message_created`` signal run here
    instead, through the one row builder (:func:`~django_cdp.capture.rows.build_row`).
    A message that is blocked, or fails (the hook raised), is written with its
    status and leaves the batch; one the hook changed is written with its new text.
    The claim cleared ``capture``, so a retry does not run them again.
    """
    hook = cdp_settings.ENRICH_MESSAGE
    listeners = message_created.has_listeners(Message)
    validation_only = hook is None and not listeners
    if validation_only and cdp_settings.VALIDATION == "off":
        return rows
    kept = []
    for row in rows:
        if row.id not in fresh or (validation_only and _conforms(row.payload)):
            # Nothing for Python to change: no hook, no listener, and the message follows
            # the tracking plan, so the row builder would return it as the trigger wrote it
            # (the trigger already applied the userId rule and the size limit). Checking
            # that costs a fraction of building the row again, per message of every batch.
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


def _conforms(payload: str) -> bool:
    """Whether the stored message certainly follows the tracking plan, by the quick check.

    When it is not sure (a format, an enum, a float where an integer is planned),
    :func:`finish_row` parses the message with exact decimals and validates it in full.
    """
    return validation.surely_conforms(json.loads(payload))


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
        match |= Q(_ids(ids), attempts=attempts)
    return Message.objects.using(using).filter(match, locked_by=token, status=PENDING)


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
    for message in Message.objects.using(using).filter(_ids(ids)).order_by("id"):
        try:
            signal.send(sender=Message, message=message)
        except Exception:  # a user's receiver must not break delivery
            logger.exception("django-cdp: a %r receiver raised", signal)


class Turn(enum.Enum):
    """What the data plane's state lets a drain do next (:meth:`_Run.endpoint_turn`)."""

    #: The data plane answers: claim full batches.
    SEND = "send"
    #: It is failing and its backoff is over: this drain sends the probe.
    PROBE = "probe"
    #: It is failing and backing off (or another worker probes): send nothing now.
    WAIT = "wait"


class Round(NamedTuple):
    """One claim, ready to send."""

    token: str
    batch: Batch
    #: ``time.monotonic()`` before the claim: the lease ends no earlier than this + lease.
    claimed_at: float
    probe: bool


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
        self.max_messages = max(1, int(cdp_settings.MAX_BATCH_MESSAGES))
        #: Messages to fetch in the next claim: about as many as fit (payloads can be large).
        self.limit = self.max_messages
        #: ``time.monotonic()`` of the data plane's last answer to this drain.
        self.answered_at: float | None = None
        #: Outcomes of delivered batches not written yet (:meth:`flush`).
        self.deferred: list[Callable[[], None]] = []

    def new_token(self) -> str:
        return f"{self.worker_id}:{secrets.token_hex(4)}"

    # The data plane's state, shared by all workers through its DeliveryEndpoint row.

    def endpoint_turn(self, *, force: bool = False) -> Turn:
        """Whether to send, probe or wait, from the data plane's row (one query when healthy).

        While the data plane is failing, one worker at a time takes the probe: the
        conditional ``UPDATE`` moves ``next_try_at`` a lease ahead, so the others
        wait until this probe's outcome (or, if its worker died, the lease's end).
        ``force`` (``cdp_deliver`` run by hand) probes even during the backoff.
        """
        endpoints = DeliveryEndpoint.objects.using(self.using).filter(url=self.url, failures__gt=0)
        if not endpoints.exists():
            return Turn.SEND
        if not force:
            endpoints = endpoints.filter(next_try_at__lte=Now())
        if endpoints.update(next_try_at=Now() + timedelta(seconds=self.lease)):
            return Turn.PROBE
        return Turn.WAIT

    def endpoint_failed(self, resp: transport.Response) -> None:
        """A failed request (5xx, 429, no answer): the data plane backs off, for all workers."""
        with _bookkeeping(self.using):
            endpoints = DeliveryEndpoint.objects.using(self.using)
            endpoints.bulk_create([DeliveryEndpoint(url=self.url)], ignore_conflicts=True)
            endpoint = endpoints.select_for_update().get(url=self.url)
            endpoint.failures += 1
            delay = outage_seconds(endpoint.failures, resp.retry_after)
            endpoints.filter(url=self.url).update(
                failures=endpoint.failures,
                next_try_at=Now() + timedelta(seconds=delay),
                failing_since=endpoint.failing_since or Now(),
                last_error=resp.describe(),
                last_response_code=resp.status,
            )
        logger.warning(
            "django-cdp: the data plane at %s is failing (%s, %d failed request(s) in a row); "
            "next try in %.1f s",
            self.url,
            resp.describe(),
            endpoint.failures,
            delay,
        )

    def endpoint_answered(self) -> None:
        """The probe got an answer: the outage is over, the whole backlog is due again."""
        with _bookkeeping(self.using):
            DeliveryEndpoint.objects.using(self.using).filter(url=self.url).update(
                failures=0, next_try_at=Now(), failing_since=None
            )
        logger.warning("django-cdp: the data plane at %s answers again", self.url)

    def endpoint_release(self) -> None:
        """Give the probe back unused (nothing was due): the next drain may probe at once."""
        with _bookkeeping(self.using):
            DeliveryEndpoint.objects.using(self.using).filter(url=self.url, failures__gt=0).update(
                next_try_at=Now()
            )

    # Claiming.

    def next_round(self, *, force: bool = False) -> Round | None:
        """Claim the next batch, as the data plane's state allows; ``None``: nothing to send."""
        fresh = self.answered_at is not None and (
            time.monotonic() - self.answered_at < ENDPOINT_RECHECK_SECONDS
        )
        turn = Turn.SEND if fresh and not force else self.endpoint_turn(force=force)
        if turn is Turn.WAIT:
            self.result.waiting = 1
            return None
        probe = turn is Turn.PROBE
        token = self.new_token()
        claimed_at = time.monotonic()
        batch = claim(
            self.using,
            token,
            max_messages=min(self.limit, PROBE_MESSAGES) if probe else self.limit,
            max_bytes=self.max_batch_bytes,
            lease_seconds=self.lease,
            probe=probe,
        )
        if probe and not batch.rows:
            self.endpoint_release()
        self.result.claimed += len(batch.rows)
        self.result.superseded += batch.superseded
        if batch.rows:
            self.limit = min(self.max_messages, max(len(batch.rows) * 5 // 4 + 1, 10))
        return Round(token, batch, claimed_at, probe)

    # Outcomes: each is one transaction with one fenced UPDATE (per attempts value), the
    # attempt rows of a failed request and the counters of a final status.

    def write(
        self,
        token: str,
        rows: Sequence[Claimed],
        attempt: FailedAttempt | None = None,
        *,
        forget_traits: bool = False,
        **fields: Any,
    ) -> int:
        """Record an outcome on the rows this claim still owns, and end their lease.

        With ``attempt`` (a failed request), the attempt is recorded for the rows in
        the same transaction: one ``bulk_create``, so a failure costs one statement
        more and a success none. A final ``status`` adds to the hourly counters, and
        ``forget_traits`` forgets the traits digests the identifies among ``rows``
        carried, in the same transaction too.
        """
        with _bookkeeping(self.using):
            n = _fenced(self.using, token, rows).update(**fields, **_CLEAR_LEASE)
            if attempt is not None:
                self.record_attempts(token, rows, attempt, n)
            if "status" in fields and n:
                # When the fence lost rows (a lease ran out) the n updated ones are
                # counted in the hours of the first n: the total is exact, and the
                # rows of one batch were nearly always written in the same hour.
                _count(self.using, fields["status"], rows[:n])
            identifies = [(r.user_id, r.message_id) for r in rows if r.type == IDENTIFY]
            if forget_traits and identifies:
                TraitsDigest.objects.using(self.using).forget_identifies(identifies)
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
                .filter(_ids(r.id for r in rows))
                .select_for_update()
                .values_list("id", flat=True)
            )
            rows = [r for r in rows if r.id in existing]
        if rows:
            DeliveryAttempt.objects.using(self.using).bulk_create(
                _attempt_rows(token, rows, attempt)
            )

    def flush(self) -> None:
        """Write the outcomes :meth:`send` deferred (called while the next request is out)."""
        while self.deferred:
            self.deferred.pop(0)()

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
        n = self.write(
            token,
            rows,
            attempt,
            forget_traits=True,
            status=Message.Status.FAILED,
            last_error=error,
            last_response_code=status,
        )
        self.result.failed += n
        logger.warning("django-cdp: %d message(s) failed for good: %s", n, error[:300])
        _notify(message_failed, self.using, (r.id for r in rows))

    def mark_retry(
        self, token: str, rows: Sequence[Claimed], resp: transport.Response, *, probe: bool
    ) -> None:
        """429/5xx/no answer: the data plane backs off; the messages wait for it.

        A probe's messages get their attempt back and stay due (the data plane's
        backoff, not theirs, decides when they go): an outage spends no attempts.
        The request that met a healthy data plane (the first of an outage, or a
        message failing on its own while others go) counts the attempt and backs the
        messages off, or dead-letters the rows that are out of attempts.
        """
        error = resp.describe()
        retry = FailedAttempt(AttemptOutcome.RETRY, resp)
        if probe:
            self.result.retrying += self.write(
                token,
                rows,
                retry,
                attempts=F("attempts") - 1,
                next_attempt_at=Now(),
                last_error=error,
                last_response_code=resp.status,
            )
        else:
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
        self.endpoint_failed(resp)

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

    def post(
        self, rows: list[Claimed], lease_left: float, meanwhile: Callable[[], None] | None
    ) -> transport.Response:
        """POST ``rows``; with ``meanwhile``, run it (the next claim) while the request is out.

        The request runs on the pool's thread and ``meanwhile`` here, so that the
        database work of the next batch overlaps the network and the data plane's
        work for this one; all database work stays on this thread (its connection,
        its transaction).
        """
        send = functools.partial(
            transport.post_batch,
            [r.payload for r in rows],
            write_key=self.write_key,
            data_plane_url=self.url,
            use_gzip=bool(cdp_settings.GZIP),
            connect_timeout=float(cdp_settings.CONNECT_TIMEOUT),
            read_timeout=float(cdp_settings.READ_TIMEOUT),
            total_timeout=min(self.request_seconds, lease_left),
        )
        self.result.requests += 1
        if meanwhile is None:
            return send()
        future = _sender().submit(send)
        meanwhile()
        return future.result()

    def send(
        self,
        token: str,
        rows: list[Claimed],
        claimed_at: float,
        probe: bool,
        meanwhile: Callable[[], None] | None,
        *,
        defer: bool = False,
    ) -> bool:
        """Send one claimed batch; split it on 400/413. False means: stop draining.

        ``meanwhile`` runs once, while the first request is out (see :meth:`post`).
        With ``defer``, a batch delivered whole has its outcome queued for
        :meth:`flush` instead of written now, so that the write overlaps the next
        request (the rows stay leased, and fenced, until then).
        """
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
            resp = self.post(part, claimed_at + self.lease - time.monotonic(), meanwhile)
            meanwhile = None
            outcome = resp.outcome
            if outcome is not Outcome.RETRY:
                self.answered_at = time.monotonic()
            if probe and outcome is not Outcome.RETRY:
                self.endpoint_answered()
                probe = False
            if outcome is Outcome.SENT and defer and not work:
                self.deferred.append(
                    functools.partial(self.mark_sent, token, part, resp.status or 200)
                )
            elif outcome is Outcome.SENT:
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
                    self.mark_retry(token, rest, resp, probe=probe)
                return False
        if meanwhile is not None:
            meanwhile()  # nothing was sent (all unsendable or erased): claim the next anyway
        return True


_sender_lock = threading.Lock()
_sender_pool: ThreadPoolExecutor | None = None
_sender_pid: int | None = None


def _sender() -> ThreadPoolExecutor:
    """This process's one request thread (re-created in a forked child, like the HTTP session)."""
    global _sender_pool, _sender_pid
    with _sender_lock:
        if _sender_pool is None or _sender_pid != os.getpid():
            _sender_pool = ThreadPoolExecutor(1, thread_name_prefix="django-cdp-send")
            _sender_pid = os.getpid()
        return _sender_pool


#: Deferred statements' rows a drain turns into messages before it claims (5-25 s of a worker's
#: time, 50-250 µs a row): the rest of a backlog waits for the next drain rather than hold up
#: sending.
EXPAND_ROWS_PER_DRAIN = 100_000


def _expand_deferred(using: str) -> None:
    """Turn committed deferred statements into messages before claiming, so their messages
    are delivered (and shown in the admin) like any other; a failure is logged and delivery
    goes on with the messages there are (the statements stay for the next run)."""
    try:
        deferred.expand(using, max_rows=EXPAND_ROWS_PER_DRAIN)
    except Exception:
        logger.exception(
            "django-cdp: could not expand deferred statements on %r; they stay stored", using
        )


def drain(
    *,
    using: str = "default",
    time_budget: float | None = None,
    worker_id: str | None = None,
    force: bool = False,
) -> DrainResult:
    """Deliver due messages in batches until none is due or ``time_budget`` seconds pass.

    First the statements the capture triggers deferred become their messages
    (:func:`django_cdp.capture.deferred.expand`), so they go out like any other.
    Safe to run concurrently (on PostgreSQL) from any number of processes; the
    claim makes sure each message is in one worker's hands at a time. Must be
    called outside a transaction so that claims and outcomes commit at once.
    With ``SEND = False`` claimed messages become ``skipped``; without a write key
    or data plane URL nothing is claimed and messages wait as ``pending``. While
    the data plane is failing it sends only a probe when its backoff is over;
    ``force`` sends one even before (``cdp_deliver`` run by hand).

    While a full batch's request is out, the previous batch's outcome is written
    and the next batch is claimed (only when the data plane is healthy and more is
    due), so the database and the network work at the same time; a claim made for
    nothing (the request failed, the budget is spent) is released at once, attempts
    refunded.
    """
    _expand_deferred(using)
    run = _Run(using, worker_id)
    send = bool(cdp_settings.SEND)
    if send and not (run.write_key and run.url):
        logger.debug("django-cdp: WRITE_KEY or DATA_PLANE_URL is empty; nothing is sent")
        return run.result
    started = time.monotonic()
    ahead: list[Round | None] = []

    def flush_and_claim_ahead() -> None:
        run.flush()
        ahead.append(run.next_round())

    def over() -> bool:
        return time_budget is not None and time.monotonic() - started >= time_budget

    try:
        current = run.next_round(force=force)
        while current is not None:
            token, batch, claimed_at, probe = current
            more = send and batch.more and not probe and not over()
            if not send:
                run.mark_skipped(token, batch.rows)
                ok = True
            else:
                # A lone batch (nothing to write or claim meanwhile) is posted on this thread.
                meanwhile = flush_and_claim_ahead if more else (run.flush if run.deferred else None)
                ok = run.send(token, batch.rows, claimed_at, probe, meanwhile, defer=more)
            claimed_ahead = bool(ahead)
            upcoming = ahead.pop() if claimed_ahead else None
            if not ok or not batch.more or over():
                if upcoming is not None and upcoming.batch.rows:
                    run.release(upcoming.token, upcoming.batch.rows)
                break
            # The send may have ended before its request (a release): then claim now.
            current = upcoming if claimed_ahead else run.next_round()
    finally:
        run.flush()
    return run.result
