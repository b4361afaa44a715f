"""Backfill: identify every existing customer once, and optionally replay their history.

A project that adopts django-cdp on an existing database has merchants the CDP
has never heard of; until each is identified, every tool behind the CDP starts
empty. :func:`backfill_identify` queues one identify per selected row of the
identity model, built exactly as the tracking core builds it (same trait
reading, value conversion, enrichment hook, size checks, traits digest), and
:func:`backfill_created` queues the historical ``<Object> Created`` events of
registered models.

Why it looks the way it does:

* **Flat memory.** The selection is streamed as primary keys with
  ``.iterator(chunk_size=batch_size)`` (a server-side cursor on PostgreSQL)
  and handled one batch at a time; nothing of a batch survives it.
* **Few queries.** Per batch: one read of the rows (``select_related`` along
  the trait paths), one read of the stored digests, one ``bulk_create`` of the
  messages and one upsert of the digests, in one transaction.
* **Restartable.** A row whose traits equal the digest last recorded for its
  userId is skipped, and each batch commits its messages with their digests,
  so an interrupted run is simply run again and queues only what is left.
  Historical ``Created`` events have a messageId derived from the object
  (``uuid5``), and a batch skips objects that already have a ``Created``
  message in the outbox; the data plane drops duplicate messageIds too.
* **Broken rows do not stop the run.** A row whose traits cannot be read (a
  property that raises, a foreign key on a trait path that points nowhere) is
  reported through ``on_error`` with its pk and skipped.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.db import connections, models, transaction
from django.utils import timezone

from django_cdp import consent, payloads
from django_cdp.capture import owners
from django_cdp.capture.rows import build_row
from django_cdp.kick import request_delivery
from django_cdp.models import Message, TraitsDigest
from django_cdp.registry import CREATED, ModelConfig, registry
from django_cdp.settings import cdp_settings
from django_cdp.signals import message_created
from django_cdp.validation import TrackingPlanViolation

#: Field names tried, in order, for the timestamp of a historical ``Created`` event.
CREATED_FIELDS = ("created_at", "created", "date_created", "created_on", "date_joined")

#: Namespace of the messageIds of historical ``Created`` events (uuid5 of model label and pk).
CREATED_NAMESPACE = uuid.UUID("6f1c2a52-2b1e-4d57-9a3c-1f1f6c0bd7a1")

ErrorHandler = Callable[[Any, str], None]
ProgressHandler = Callable[[int], None]


@dataclass
class BackfillResult:
    """Counts of one phase (``identify``, or one model's ``Created`` events)."""

    phase: str
    total: int = 0
    #: Rows looked at so far (queued + unchanged + unsendable + errors + gone + withheld).
    done: int = 0
    queued: int = 0
    #: Identify: traits equal to the last recorded digest. Created: already in the outbox.
    unchanged: int = 0
    #: Stored but never sent: failed (no userId, too large) or blocked by validation.
    unsendable: int = 0
    errors: int = 0
    #: Rows deleted between the count and their batch.
    gone: int = 0
    #: Rows of owners without consent (``CONSENT``), skipped: nothing is written for them.
    withheld: int = 0
    #: The first message that was (or, with ``dry_run``, would be) queued: its payload text.
    sample: str | None = None


# --- selection ---------------------------------------------------------------------------------


def identity_queryset(
    using: str,
    *,
    pks: Iterable[Any] | None = None,
    since: datetime.date | datetime.datetime | None = None,
    date_field: str | None = None,
    filters: Iterable[tuple[str, str]] = (),
) -> models.QuerySet:
    """The identity rows a backfill covers: all of them, or those matching every criterion.

    ``since`` needs ``date_field`` (a date or datetime field of the identity
    model); a date given for a datetime field means midnight in the current time
    zone. ``filters`` are ``(lookup, value)`` pairs passed to ``filter()``, so
    ``plan__name=Growth`` works as it would in the ORM.
    """
    identity = registry.identity
    if identity is None:
        raise ValueError("DJANGO_CDP['IDENTITY'] is not configured (see manage.py check)")
    queryset = identity.model._base_manager.using(using).all()
    if pks is not None:
        queryset = queryset.filter(pk__in=list(pks))
    if since is not None:
        if not date_field:
            raise ValueError("since needs date_field")
        field = identity.model._meta.get_field(date_field)
        if not isinstance(field, models.DateField):
            raise ValueError(f"{identity.model._meta.label}.{date_field} is not a date field")
        queryset = queryset.filter(**{f"{date_field}__gte": _bound(since, field)})
    for lookup, value in filters:
        queryset = queryset.filter(**{lookup: value})
    return queryset


def _bound(value: datetime.date, field: models.Field) -> datetime.date:
    if isinstance(field, models.DateTimeField) and not isinstance(value, datetime.datetime):
        value = datetime.datetime.combine(value, datetime.time.min)
    if isinstance(value, datetime.datetime) and timezone.is_naive(value):
        value = timezone.make_aware(value)
    return value


def _batches(queryset: models.QuerySet, batch_size: int) -> Iterator[list[Any]]:
    """Primary keys of ``queryset`` in pk order, ``batch_size`` at a time, from one cursor."""
    stream = queryset.order_by("pk").values_list("pk", flat=True).iterator(chunk_size=batch_size)
    batch: list[Any] = []
    for pk in stream:
        batch.append(pk)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _fetch(
    model: type[models.Model], sources: tuple[Any, ...], pks: list[Any], using: str, result
) -> tuple[dict[Any, models.Model], list[Any]]:
    """The batch's rows by pk, and the pks whose row is there but cannot be joined."""
    rows = {
        obj.pk: obj
        for obj in payloads.joined_for(model._base_manager.using(using), sources).filter(pk__in=pks)
    }
    missing = [pk for pk in pks if pk not in rows]
    broken: list[Any] = []
    if missing:
        # select_related joins non-null foreign keys with INNER JOIN: a row whose foreign key
        # points nowhere drops out. Tell those apart from rows deleted since the count.
        present = set(
            model._base_manager.using(using).filter(pk__in=missing).values_list("pk", flat=True)
        )
        broken = [pk for pk in missing if pk in present]
        result.gone += len(missing) - len(broken)
        result.done += len(missing) - len(broken)
    return rows, broken


def _in_database(using: str) -> bool:
    """Whether the database writes the identifies itself (:func:`_identify_in_database`).

    On PostgreSQL, when every trait is a field or a path, and when nothing must run in
    Python as each message is written: no ``ENRICH_MESSAGE`` hook (it may fail a message,
    which the run reports), no ``block`` or ``raise`` validation (a blocked message is
    reported too), no ``message_created`` receiver.
    """
    return (
        owners.in_database(using)
        and cdp_settings.ENRICH_MESSAGE is None
        and cdp_settings.VALIDATION in ("off", "flag")
        and not message_created.has_listeners(Message)
    )


def _backfill_sql(using: str, force: bool) -> str:
    from django_cdp.capture.triggers import Generator

    return Generator(connections[using]).backfill_sql(registry.configured_identity, force=force)


def _identify_in_database(
    statement: str,
    pks: list[Any],
    using: str,
    result: BackfillResult,
    on_error: ErrorHandler | None,
) -> None:
    """One batch on PostgreSQL: one statement computes the traits and digests, writes the
    identifies of the owners whose traits changed and records their digests, as the capture
    triggers do (their Python part runs when delivery claims them)."""
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute(statement, [[str(pk) for pk in pks]])
        rows = cursor.fetchall()
        transaction.on_commit(lambda: request_delivery(using), using=using)
    written = [row for row in rows if row[0] is not None]
    found = rows[0][4]
    result.gone += len(pks) - found
    result.unchanged += found - len(written)
    result.done += len(pks)
    for status, reason, pk, payload, _ in written:
        if status == Message.Status.PENDING:
            result.queued += 1
        else:
            result.unsendable += 1
            _error(result, on_error, pk, f"stored as {status}: {reason}", count=False)
        if result.sample is None:
            result.sample = payload


def _created_message(
    message: Callable[[dict[str, Any]], dict[str, Any]], obj: models.Model, config: ModelConfig
) -> dict[str, Any]:
    """A backfilled Created track of ``obj`` with its properties as the database holds them."""
    return message(payloads.properties_of(obj, config))


def _read_identities(
    pks: list[Any], using: str, result: BackfillResult, on_error: ErrorHandler | None
) -> list[tuple[Any, models.Model | None, owners.Traits]]:
    """(pk, object, traits) of a batch of identity rows.

    On PostgreSQL the database computes the traits and their digests in one
    query, as the triggers do, without loading the objects (unless an
    ``ENRICH_MESSAGE`` hook needs them); elsewhere the objects are loaded with
    their trait paths joined and converted in Python. A failure is returned as
    traits that cannot be sent, stored as a failed identify with its reason.
    """
    identity = registry.configured_identity
    if owners.in_database(using) and cdp_settings.ENRICH_MESSAGE is None:
        batch = owners.traits_batch(pks, using)
        out: list[tuple[Any, models.Model | None, owners.Traits]] = [
            (pk, None, batch[str(pk)]) for pk in pks if str(pk) in batch
        ]
        result.gone += len(pks) - len(out)
        result.done += len(pks) - len(out)
        return out
    config = registry.config(identity.model)
    rows_by_pk, broken = _fetch(identity.model, identity.traits, pks, using, result)
    for pk in broken:
        _error(result, on_error, pk, "a foreign key on a trait path points to a missing row")
    read = []
    for pk in pks:
        obj = rows_by_pk.get(pk)
        if obj is None:
            continue
        try:
            owner = owners.resolve_owner(obj, config, using)
            user_id = owner[1] if owner is not None else None
        except Exception as exc:
            read.append((pk, obj, owners.Traits(None, f"owner: {_describe(exc)}", "", None)))
            continue
        traits = owners.traits_from(
            partial(payloads.read_sources, obj, identity.traits), None, user_id
        )
        read.append((pk, obj, traits))
    stored = dict(
        TraitsDigest.objects.using(using)
        .filter(user_id__in=[t.user_id for _, _, t in read if t.user_id])
        .values_list("user_id", "digest")
    )
    return [
        (pk, obj, replace(t, stored=stored.get(t.user_id) if t.user_id else None))
        for pk, obj, t in read
    ]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _write(rows: list[Message], digests: list[tuple[str, str, str]], using: str) -> None:
    """One batch in one transaction: the messages, their digests, and the delivery kick."""
    with transaction.atomic(using=using):
        Message.objects.using(using).bulk_create(rows)
        TraitsDigest.objects.using(using).upsert(digests)
        if message_created.has_listeners(Message):
            for row in rows:
                message_created.send(sender=Message, message=row)
        transaction.on_commit(lambda: request_delivery(using), using=using)


# --- identifies --------------------------------------------------------------------------------


def backfill_identify(
    queryset: models.QuerySet,
    *,
    using: str,
    batch_size: int = 500,
    dry_run: bool = False,
    force: bool = False,
    total: int | None = None,
    on_error: ErrorHandler | None = None,
    on_progress: ProgressHandler | None = None,
) -> BackfillResult:
    """Queue one identify per row of ``queryset`` (identity rows) whose traits changed.

    ``force`` queues even rows whose traits equal the recorded digest;
    ``dry_run`` computes everything and writes nothing. ``total`` is what
    ``on_progress(done)`` counts towards (the caller's ``COUNT(*)``).
    """
    identity = registry.configured_identity
    result = BackfillResult("identify", total=total or 0)
    # On PostgreSQL one statement per batch, written once for the run.
    statement = _backfill_sql(using, force) if not dry_run and _in_database(using) else None
    for pks in _batches(queryset, batch_size):
        allowed = consent.allowed_pks(pks, using)
        if len(allowed) < len(pks):
            result.withheld += len(pks) - len(allowed)
            result.done += len(pks) - len(allowed)
            pks = [pk for pk in pks if pk in allowed]
            if not pks:
                continue
        if statement is not None:
            _identify_in_database(statement, pks, using, result, on_error)
            if on_progress is not None:
                on_progress(result.done)
            continue
        read = _read_identities(pks, using, result, on_error)
        rows: list[Message] = []
        digests: dict[str, tuple[str, str, str]] = {}
        for pk, obj, traits in read:
            user_id, digest = traits.user_id, traits.digest
            if not force and user_id and digest and traits.stored == digest:
                result.unchanged += 1
                result.done += 1
                continue
            message_id = payloads.new_message_id()
            try:
                row = build_row(
                    partial(
                        # values is None only with an error, and then build_row keeps the minimal
                        payloads.identify_message,
                        user_id,
                        traits.values or {},
                        message_id=message_id,
                    ),
                    payloads.identify_message(user_id, {}, message_id=message_id),
                    instance=obj,
                    source=(identity.model, pk),
                    error=traits.error,
                )
            except TrackingPlanViolation as exc:  # VALIDATION = "raise"
                _error(result, on_error, pk, _describe(exc))
                continue
            rows.append(row)
            result.done += 1
            if row.status == Message.Status.PENDING:
                result.queued += 1
                digests[row.user_id] = (row.user_id, digest, row.message_id)
            else:
                result.unsendable += 1
                _error(
                    result, on_error, pk, f"stored as {row.status}: {row.last_error}", count=False
                )
            if result.sample is None:
                result.sample = row.payload
        del read
        if rows and not dry_run:
            _write(rows, list(digests.values()), using)
        del rows, digests
        if on_progress is not None:
            on_progress(result.done)
    return result


def _error(
    result: BackfillResult, on_error: ErrorHandler | None, pk: Any, text: str, *, count=True
) -> None:
    if count:
        result.errors += 1
        result.done += 1
    if on_error is not None:
        on_error(pk, text)


# --- historical Created events -----------------------------------------------------------------


def created_field(model: type[models.Model], preferred: str | None = None) -> str | None:
    """The date or datetime field holding when an object was created, or None.

    ``preferred`` (``--date-field``) wins when the model has it; otherwise the
    first of :data:`CREATED_FIELDS` that is a date field.
    """
    for name in ([preferred] if preferred else []) + list(CREATED_FIELDS):
        try:
            field = model._meta.get_field(name)
        except FieldDoesNotExist:
            continue
        if isinstance(field, models.DateField) and field.concrete:
            return name
    return None


def created_configs() -> list[ModelConfig]:
    """Registered models that emit ``Created`` events, in settings order."""
    return [c for c in registry if CREATED in c.events]


def created_message_id(config: ModelConfig, pk: Any) -> str:
    """The fixed messageId of an object's historical ``Created`` event."""
    return str(uuid.uuid5(CREATED_NAMESPACE, f"{config.model._meta.label_lower}:{pk}"))


def created_queryset(
    config: ModelConfig, identities: models.QuerySet | None, using: str
) -> models.QuerySet:
    """The objects of ``config``'s model owned by ``identities`` (all when None)."""
    queryset = config.model._base_manager.using(using).all()
    if identities is None:
        return queryset
    owners = identities.values("pk")
    if config.is_identity:
        return queryset.filter(pk__in=owners)
    return queryset.filter(**{f"{config.owner_path}__in": owners})


def _when(value: Any) -> datetime.datetime | None:
    if value is None or isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.combine(value, datetime.time.min)


def _owners(
    config: ModelConfig, rows_by_pk: dict[Any, models.Model], queued: set[str], using: str
) -> dict[Any, tuple[owners.Owner | None, str]]:
    """(owner, problem) of each object of a batch not yet in the outbox: the owner, or None
    and why it could not be resolved (stored with the failed message)."""
    out: dict[Any, tuple[owners.Owner | None, str]] = {}
    for pk, obj in rows_by_pk.items():
        if str(pk) in queued:
            continue
        try:
            out[pk] = owners.resolve_owner(obj, config, using), ""
        except Exception as exc:
            out[pk] = None, f"owner: {_describe(exc)}"
    return out


def backfill_created(
    config: ModelConfig,
    queryset: models.QuerySet,
    *,
    timestamp_field: str,
    using: str,
    batch_size: int = 500,
    dry_run: bool = False,
    total: int | None = None,
    on_error: ErrorHandler | None = None,
    on_progress: ProgressHandler | None = None,
) -> BackfillResult:
    """Queue the ``Created`` event of every object in ``queryset`` not already in the outbox.

    Each event carries the object's current mapped properties (its state at
    creation is not recorded anywhere) and ``originalTimestamp`` from
    ``timestamp_field``. An object whose ``timestamp_field`` is empty is
    reported as an error: an event dated today would misplace history. Objects of
    owners without consent (``CONSENT``) are skipped, as the live capture would have
    withheld their events.
    """
    event = config.event_name(CREATED)
    label = config.model._meta.label_lower
    result = BackfillResult(event, total=total or 0)
    for pks in _batches(queryset, batch_size):
        rows_by_pk, broken = _fetch(config.model, config.properties, pks, using, result)
        for pk in broken:
            _error(result, on_error, pk, "a foreign key on a property path points to a missing row")
        queued = set(
            Message.objects.using(using)
            .filter(source_model=label, source_pk__in=[str(pk) for pk in rows_by_pk], event=event)
            .values_list("source_pk", flat=True)
        )
        resolved = _owners(config, rows_by_pk, queued, using)
        allowed = consent.allowed_pks({o[0] for o, _ in resolved.values() if o}, using)
        rows: list[Message] = []
        for pk in pks:
            obj = rows_by_pk.get(pk)
            if obj is None:
                continue
            if str(pk) in queued:
                result.unchanged += 1
                result.done += 1
                continue
            owner, problem = resolved[pk]
            if owner is not None and owner[0] not in allowed:
                result.withheld += 1
                result.done += 1
                continue
            when = _when(getattr(obj, timestamp_field))
            if when is None:
                _error(result, on_error, pk, f"ValueError: {timestamp_field} is empty")
                continue
            message = partial(
                payloads.track_message,
                event,
                owner[1] if owner else None,
                integrations=config.integrations,
                when=when,
                message_id=created_message_id(config, pk),
            )
            try:
                row = build_row(
                    partial(_created_message, message, obj, config),
                    message({}),
                    instance=obj,
                    source=(config.model, pk),
                    error=problem,
                )
            except TrackingPlanViolation as exc:  # VALIDATION = "raise"
                _error(result, on_error, pk, _describe(exc))
                continue
            rows.append(row)
            result.done += 1
            if row.status == Message.Status.PENDING:
                result.queued += 1
            else:
                result.unsendable += 1
                _error(
                    result, on_error, pk, f"stored as {row.status}: {row.last_error}", count=False
                )
            if result.sample is None:
                result.sample = row.payload
        if rows and not dry_run:
            _write(rows, [], using)
        del rows
        if on_progress is not None:
            on_progress(result.done)
    return result
