"""Recording changes in the outbox, in the transaction of the change they describe.

Every recording runs in two phases, so that our code cannot cost the user a write:

1. **Build.** Everything that is Python and may fail on the user's data runs
   first, outside any atomic block of ours: reading the values, converting
   them, resolving the owner, reading the owner's traits, the enrichment
   hook, validation, encoding and the size limit (:func:`django_cdp.rows.build_row`).
   A message that cannot be built becomes a ``failed`` row with its reason.
2. **Write.** Then only complete statements on outbox rows run: INSERTs, the
   UPDATE or DELETE of a row this transaction wrote earlier, and the traits
   digest upsert. Inside the user's transaction they run as they are (a
   database error propagates, like any other in that transaction); in
   autocommit, more than one statement runs in a short transaction of ours.

Within one transaction the writer coalesces: one event per object (several
saves give one message with the final values; create then update is one
``Created``; update then delete only ``Deleted``; create then delete nothing)
and at most one identify per owner, with the final traits. It remembers what
it wrote per transaction and per savepoint: each savepoint level in which it
wrote registers a no-op ``on_commit`` marker, and Django discards the markers
of a savepoint that rolls back, so an entry whose marker is gone was rolled
back with its rows and is forgotten.

Messages describe rows as the database holds them: values go through their
field (``to_python``, a ``DecimalField``'s places), and after
``save(update_fields=...)`` the columns left out are sent with the values
read from the database, not the unsaved ones on the instance.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import DatabaseError, connections, models, transaction
from django.db.models import Subquery

from django_cdp import payloads, statements, validation
from django_cdp.models import Message, TraitsDigest
from django_cdp.registry import CREATED, DELETED, UPDATED, ModelConfig, registry
from django_cdp.rows import SourceRef, build_row, describe
from django_cdp.settings import cdp_settings
from django_cdp.signals import message_created

logger = logging.getLogger("django_cdp")

_BEFORE = "_django_cdp_before"
_OWNER = "_django_cdp_owner"
_STATE = "_django_cdp_transaction"

Owner = tuple[Any, str | None]  # (pk of the identity row, userId)


# --- per-transaction state ---------------------------------------------------------------------


@dataclass
class _Entry:
    row_id: int | None  # None: nothing stored (an identify skipped as unchanged)
    action: str
    marker: Callable[[], None]
    message_id: str = ""
    #: For changes: attname -> value when the transaction first saw the row (what a net
    #: change is measured against).
    reference: dict[str, Any] = field(default_factory=dict)
    #: For changes: attname -> value the database holds now, after our last recorded save.
    current: dict[str, Any] = field(default_factory=dict)
    digest: str = ""


class _Transaction:
    """What this process wrote in the current transaction of one connection."""

    def __init__(self, using: str) -> None:
        self.using = using
        self.connection = connections[using]
        self.changes: dict[tuple[str, Any], _Entry] = {}
        self.identifies: dict[Any, _Entry] = {}
        self.deleting: dict[Any, Callable[[], None]] = {}
        self.wrote = False
        self._markers: dict[tuple[str, ...], Callable[[], None]] = {}

        def django_cdp_after_commit() -> None:
            if self.connection.__dict__.get(_STATE) is self:
                del self.connection.__dict__[_STATE]
            if self.wrote:
                _kick(self.using)

        self.root = django_cdp_after_commit
        self.connection.on_commit(self.root, robust=True)
        self._markers[tuple(self.connection.savepoint_ids)] = self.root

    def marker(self) -> Callable[[], None]:
        """The marker of the current savepoint level, registered on first use."""
        sids = tuple(self.connection.savepoint_ids)
        marker = self._markers.get(sids)
        if marker is None:

            def django_cdp_savepoint_marker() -> None:
                """Does nothing: its presence says the savepoint was not rolled back."""

            marker = django_cdp_savepoint_marker
            self.connection.on_commit(marker)
            self._markers[sids] = marker
        return marker

    def alive(self, marker: Callable[[], None]) -> bool:
        return any(func is marker for _, func, _ in self.connection.run_on_commit)

    def live(self, entries: dict, key: Any) -> _Entry | None:
        """The entry for ``key`` unless its savepoint was rolled back (then it is dropped)."""
        entry = entries.get(key)
        if entry is not None and not self.alive(entry.marker):
            del entries[key]
            return None
        return entry


def _current(using: str, *, create: bool = True) -> _Transaction | None:
    """The state of the open transaction on ``using`` (``create`` inside an atomic block)."""
    connection = connections[using]
    state = connection.__dict__.get(_STATE)
    if state is not None and state.alive(state.root):
        return state
    if not create or not connection.in_atomic_block:
        return None
    state = _Transaction(using)
    connection.__dict__[_STATE] = state
    return state


def _live(using: str, entries: str, key: Any) -> _Entry | None:
    """The live entry for ``key`` in the open transaction, read without creating state."""
    tx = _current(using, create=False)
    return tx.live(getattr(tx, entries), key) if tx is not None else None


@contextlib.contextmanager
def _writing(using: str) -> Iterator[_Transaction]:
    """The write phase: only complete statements on outbox rows run inside.

    Inside the user's transaction no block of ours is opened (nothing here can
    mark theirs for rollback); in autocommit the statements share one short
    transaction of ours.
    """
    if connections[using].in_atomic_block:
        yield _current(using)
    else:
        with transaction.atomic(using=using, savepoint=False):
            yield _current(using)


def forget_transaction(using: str = "default") -> None:
    """Forget what the writer recorded so far in the open transaction on ``using``.

    Later changes in the same transaction are then recorded as if a new
    transaction had begun: a save of an object created earlier becomes an
    ``Updated`` instead of being folded into its ``Created``. Meant for test
    suites, where a ``TestCase`` runs ``setUp`` and the test in one
    transaction (``django_cdp.testing.capture_messages(new_transaction=True)``).
    Rows already written stay; nothing is committed or rolled back.
    """
    connections[using].__dict__.pop(_STATE, None)


# --- statements --------------------------------------------------------------------------------


def _insert(row: Message, using: str) -> None:
    statements.insert_message(row, using)
    if message_created.has_listeners(Message):
        # A receiver is the project's code: its failure must not reach the user's write.
        for receiver, result in message_created.send_robust(sender=Message, message=row):
            if isinstance(result, Exception):
                logger.error(
                    "django-cdp: a message_created receiver %r raised %r", receiver, result
                )


def _store(tx: _Transaction, row: Message) -> None:
    """Insert a row in the open transaction, which then asks for delivery after commit."""
    _insert(row, tx.using)
    tx.wrote = True


def _rewrite(tx: _Transaction, entry: _Entry, row: Message) -> None:
    """Replace a row written earlier in this transaction (same messageId) with ``row``.

    The row is not committed yet, so no worker can have touched it: its status
    is exactly what the final message makes it (a too-large message that shrank
    is pending again).
    """
    Message.objects.using(tx.using).filter(pk=entry.row_id).update(
        payload=row.payload,
        event=row.event,
        user_id=row.user_id,
        status=row.status,
        last_error=row.last_error,
        violations=row.violations,
    )


def _discard(tx: _Transaction, entry: _Entry) -> None:
    if entry.row_id is not None:
        Message.objects.using(tx.using).filter(pk=entry.row_id).delete()


def _kick(using: str) -> None:
    """Ask for delivery of what was just committed (never raises)."""
    from django_cdp.delivery import request_delivery

    request_delivery(using)


# --- building messages -------------------------------------------------------------------------


def _source(instance: models.Model) -> SourceRef:
    return type(instance), instance.pk


def _track_row(
    instance: models.Model,
    config: ModelConfig,
    action: str,
    owner: Owner | None,
    *,
    changed: list[str] | None = None,
    stored: dict[str, Any] | None = None,
    message_id: str | None = None,
    owner_error: str = "",
) -> Message:
    """The row of a ``<Object> Created|Updated|Deleted`` track (never raises but for
    ``VALIDATION = "raise"``)."""
    user_id = owner[1] if owner else None
    message_id = message_id or payloads.new_message_id()
    event = config.event_name(action)

    def make() -> dict[str, Any]:
        properties = payloads.properties_of(instance, config, stored)
        if changed is not None:
            properties["changed_fields"] = changed
        return payloads.track_message(
            event, user_id, properties, integrations=config.integrations, message_id=message_id
        )

    minimal = payloads.track_message(
        event, user_id, {}, integrations=config.integrations, message_id=message_id
    )
    return build_row(make, minimal, instance=instance, source=_source(instance), error=owner_error)


def _user_id(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def resolve_owner(
    instance: models.Model,
    config: ModelConfig,
    using: str,
    stored: dict[str, Any] | None = None,
) -> Owner | None:
    """The owning identity row of an object: its pk and userId, or None when it has none.

    One foreign key away with the pk as userId, both come from memory (or from
    ``stored``, the database's values of columns a ``save(update_fields=...)``
    left out); otherwise one query follows the owner path.
    """
    identity = registry.identity
    if config.is_identity:
        return instance.pk, _user_id(getattr(instance, identity.user_id_field.attname))
    attname = config.owner_attname
    if attname is not None and identity.user_id_is_pk:
        owner_pk = stored[attname] if stored and attname in stored else getattr(instance, attname)
        return None if owner_pk is None else (owner_pk, _user_id(owner_pk))
    row = (
        config.model._base_manager.using(using)
        .filter(pk=instance.pk)
        .values_list(
            f"{config.owner_path}__pk", f"{config.owner_path}__{identity.user_id_field.name}"
        )
        .first()
    )
    if row is None or row[0] is None:
        return None
    return row[0], _user_id(row[1])


def _owner(
    instance: models.Model, config: ModelConfig, using: str, stored: dict | None = None
) -> tuple[Owner | None, str]:
    """:func:`resolve_owner`, with a failure turned into a reason (database errors propagate)."""
    try:
        return resolve_owner(instance, config, using, stored), ""
    except DatabaseError:
        raise
    except Exception as exc:
        return None, f"owner: {type(exc).__name__}: {exc}"


def _read_traits(owner: Owner, using: str, instance: models.Model | None):
    """The owner's current traits (a callable that converts them) and its recorded digest.

    One query reads the traits as the database holds them, with the digest of
    the last identify recorded for the user. Returns None when the owner row
    is gone. The traits come back as a function, so that a value that cannot
    be converted fails inside :func:`build_row`, as a failed identify row.
    """
    identity = registry.identity
    digest = Subquery(
        TraitsDigest.objects.using(using).filter(user_id=owner[1]).values("digest")[:1]
    )
    queryset = identity.model._base_manager.using(using).filter(pk=owner[0])
    queryset = queryset.annotate(django_cdp_digest=digest)
    if identity.needs_instance:
        if instance is None:
            instance = payloads.joined_for(queryset, identity.traits).first()
            if instance is None:
                return None
            stored = instance.django_cdp_digest
        else:
            # Properties and methods compute from the instance in hand.
            stored = (
                TraitsDigest.objects.using(using)
                .filter(user_id=owner[1])
                .values_list("digest", flat=True)
                .first()
            )
        obj = instance
        return (lambda: payloads.read_sources(obj, identity.traits)), stored
    row = queryset.values(*identity.trait_paths, "django_cdp_digest").first()
    if row is None:
        return None
    return (lambda: payloads.values_of(row, identity.traits)), row["django_cdp_digest"]


@dataclass
class _Identify:
    """A planned identify: built before any write, applied in the write phase."""

    owner: Owner
    digest: str  # "" when the traits could not be built
    row: Message | None  # None: unchanged, only remembered
    entry: _Entry | None


def _plan_identify(
    owner: Owner, using: str, *, force: bool = False, instance: models.Model | None = None
) -> _Identify | None:
    """Identify an owner with its current traits, at most once per transaction.

    Skipped when the traits equal the last identify recorded for the user
    (in this transaction, or in ``TraitsDigest``), unless ``force`` or
    ``SEND_UNCHANGED_IDENTIFY``. An owner that was never identified (created
    before tracking, or by ``bulk_create``) or whose traits changed behind the
    ORM has a different digest, so it is identified.
    """
    read = _read_traits(owner, using, instance)
    if read is None:
        return None
    traits_of, stored = read
    source = (registry.identity.model, owner[0])
    try:
        traits = traits_of()
    except payloads.PayloadError as exc:
        traits, error = None, str(exc)
    else:
        error = ""
    digest = payloads.traits_digest(traits) if traits is not None else ""
    entry = _live(using, "identifies", owner[0])
    if entry is not None:
        if digest and entry.digest == digest and not (force and entry.row_id is None):
            return None
    elif digest and digest == stored and not (force or cdp_settings.SEND_UNCHANGED_IDENTIFY):
        return _Identify(owner, digest, None, None)
    message_id = (
        entry.message_id if entry is not None and entry.row_id else payloads.new_message_id()
    )
    minimal = payloads.identify_message(owner[1], {}, message_id=message_id)
    row = build_row(
        lambda: payloads.identify_message(owner[1], traits, message_id=message_id),
        minimal,
        instance=instance,
        source=source,
        error=error,
    )
    return _Identify(owner, digest, row, entry)


def _apply_identify(tx: _Transaction, plan: _Identify) -> None:
    owner_pk, user_id = plan.owner
    if plan.row is None:
        tx.identifies[owner_pk] = _Entry(None, "identify", tx.marker(), digest=plan.digest)
        return
    row, entry = plan.row, plan.entry
    if entry is not None and entry.row_id is not None:
        _rewrite(tx, entry, row)
        entry.digest = plan.digest
    else:
        _store(tx, row)
        tx.identifies[owner_pk] = _Entry(
            row.pk, "identify", tx.marker(), row.message_id, digest=plan.digest
        )
    digests = TraitsDigest.objects.using(tx.using)
    if row.status == Message.Status.PENDING:
        digests.upsert([(user_id, plan.digest, row.message_id)])
    elif entry is not None:
        # An earlier version of this identify recorded its digest; this one is not sent.
        digests.forget(user_id, message_id=row.message_id)


# --- change detection --------------------------------------------------------------------------


@dataclass
class _Before:
    """What ``pre_save`` learnt: the database's values of the tracked columns, and which
    columns the save writes (None: all of them)."""

    stored: dict[str, Any]
    written: frozenset[str] | None


def _comparable(config: ModelConfig, attname: str, value: Any) -> Any:
    try:
        return config.column_fields[attname].to_python(value)
    except ValidationError:
        return value


def written_columns(
    config: ModelConfig, update_fields: frozenset[str] | None
) -> frozenset[str] | None:
    """The attnames a save with ``update_fields`` writes (None: every column)."""
    if update_fields is None:
        return None
    return frozenset(
        f.attname
        for f in config.model._meta.concrete_fields
        if f.name in update_fields or f.attname in update_fields
    )


def before_save(
    instance: models.Model,
    config: ModelConfig,
    using: str,
    update_fields: frozenset[str] | None,
) -> None:
    """Remember the tracked columns as the database holds them before an update (``pre_save``).

    One narrow read of those columns, skipped when the object is new, when
    ``update_fields`` touches none of them, or when this transaction already
    knows the values. They serve twice: to tell what changed, and to send the
    columns a ``save(update_fields=...)`` leaves out as the database holds them.
    """
    if instance._state.adding or instance.pk is None:
        return
    entry = _live(using, "changes", (config.label, instance.pk))
    if entry is None and UPDATED not in config.events:
        return
    written = written_columns(config, update_fields)
    if entry is not None:
        instance.__dict__[_BEFORE] = _Before(entry.current, written)
        return
    columns = tuple(config.tracked_columns)
    if not columns or (written is not None and not written.intersection(columns)):
        instance.__dict__[_BEFORE] = _Before({}, frozenset())
        return
    row = statements.read_columns(config.model, using, instance.pk, columns)
    if row is not None:
        instance.__dict__[_BEFORE] = _Before(dict(zip(columns, row, strict=True)), written)


def remember_before(
    instance: models.Model, values: dict[str, Any], written: frozenset[str] | None
) -> None:
    """Give ``after_save`` the old column values of an update made without ``pre_save``."""
    instance.__dict__[_BEFORE] = _Before(values, written)


def forget_before(instance: models.Model) -> None:
    instance.__dict__.pop(_BEFORE, None)


def _after(instance: models.Model, config: ModelConfig, before: _Before) -> dict[str, Any]:
    """The tracked columns as the database holds them after the save."""
    return {
        attname: (
            _comparable(config, attname, getattr(instance, attname))
            if before.written is None or attname in before.written
            else before.stored[attname]
        )
        for attname in before.stored
    }


def _unwritten(before: _Before | None) -> dict[str, Any] | None:
    """The stored values of the columns the save left out, which the message must use."""
    if before is None or before.written is None:
        return None
    return {k: v for k, v in before.stored.items() if k not in before.written}


def _changed(config: ModelConfig, after: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Property names whose source columns differ from ``reference``, in mapping order."""
    columns = {attname for attname, old in reference.items() if after.get(attname, old) != old}
    return [
        name
        for attname, names in config.tracked_columns.items()
        if attname in columns
        for name in names
    ]


def _snapshot(instance: models.Model, config: ModelConfig) -> dict[str, Any]:
    return {
        attname: _comparable(config, attname, getattr(instance, attname))
        for attname in config.tracked_columns
    }


# --- recording changes -------------------------------------------------------------------------


def after_save(instance: models.Model, config: ModelConfig, created: bool, using: str) -> None:
    """Record a create or update (``post_save``), coalescing within the transaction.

    Every save re-identifies the owner when its traits differ from the last
    identify recorded (``identify`` on the model): one read of the traits with
    the digest, and nothing written when they are unchanged.
    """
    before = instance.__dict__.pop(_BEFORE, None)
    key = (config.label, instance.pk)
    entry = _live(using, "changes", key)
    changed: list[str] | None = None
    after: dict[str, Any] = {}
    if created:
        action, write = CREATED, CREATED in config.events
        after = _snapshot(instance, config)
    elif entry is not None and entry.action == CREATED and before is not None:
        action = CREATED
        after = _after(instance, config, before)
        write = CREATED in config.events and bool(_changed(config, after, entry.current))
    elif before is not None:
        action = UPDATED
        after = _after(instance, config, before)
        changed = _changed(config, after, entry.reference if entry is not None else before.stored)
        # With an earlier Updated in this transaction, no net change means dropping it.
        write = bool(changed) or entry is not None
    else:
        action, write = UPDATED, False
    reidentifies = config.identify or config.is_identity
    if not (write or reidentifies):
        return

    # Build: everything that may fail on the user's data, before any statement of ours.
    stored = _unwritten(before)
    owner, owner_error = _owner(instance, config, using, stored)
    discard = write and action == UPDATED and not changed
    row = None
    if write and not discard:
        row = _track_row(
            instance,
            config,
            action,
            owner,
            changed=changed,
            stored=stored,
            message_id=entry.message_id if entry is not None else None,
            owner_error=owner_error,
        )
    plan = None
    if reidentifies and owner is not None:
        plan = _plan_identify(owner, using, instance=instance if config.is_identity else None)
    in_tx = _in_tx(using)
    if plan is not None and plan.row is None and not in_tx:
        plan = None  # unchanged traits, and no transaction to remember them in
    if row is None and not discard and plan is None:
        return
    if not in_tx and plan is None:
        # Autocommit and a single INSERT: atomic by itself, no BEGIN/COMMIT round trips.
        _insert(row, using)
        _kick(using)
        return
    with _writing(using) as tx:
        if discard:
            _discard(tx, entry)
            del tx.changes[key]
        elif row is not None:
            if entry is not None:
                _rewrite(tx, entry, row)
                entry.current = after
            else:
                _store(tx, row)
                reference = after if action == CREATED else before.stored
                tx.changes[key] = _Entry(
                    row.pk, action, tx.marker(), row.message_id, reference, after
                )
        elif entry is not None:
            entry.current = after
        if plan is not None:
            _apply_identify(tx, plan)


def _in_tx(using: str) -> bool:
    return connections[using].in_atomic_block


def before_delete(instance: models.Model, config: ModelConfig, using: str) -> None:
    """Record a delete (``pre_delete``, while the row and its parents still exist)."""
    key = (config.label, instance.pk)
    entry = _live(using, "changes", key)
    owner, owner_error = _owner(instance, config, using)
    row = None
    if DELETED in config.events and not (entry is not None and entry.action == CREATED):
        row = _track_row(instance, config, DELETED, owner, owner_error=owner_error)
    with _writing(using) as tx:
        if config.is_identity:
            tx.deleting[instance.pk] = tx.marker()
            pending = tx.live(tx.identifies, instance.pk)
            if pending is not None:
                _discard(tx, pending)
                if owner is not None and owner[1]:
                    TraitsDigest.objects.using(using).forget(owner[1], pending.message_id)
                del tx.identifies[instance.pk]
        entry = tx.live(tx.changes, key)
        if entry is not None:
            _discard(tx, entry)
            del tx.changes[key]
        if row is not None:
            _store(tx, row)
        if config.identify and not config.is_identity and owner is not None:
            instance.__dict__[_OWNER] = owner


def after_delete(instance: models.Model, config: ModelConfig, using: str) -> None:
    """Re-identify the owner of a deleted object (``post_delete``) unless it goes too."""
    owner = instance.__dict__.pop(_OWNER, None)
    if owner is None:
        return
    tx = _current(using, create=False)
    if tx is not None:
        marker = tx.deleting.get(owner[0])
        if marker is not None and tx.alive(marker):
            return
    _write_identify(_plan_identify(owner, using), using)


def _write_identify(plan: _Identify | None, using: str) -> None:
    """The write phase of an identify planned on its own."""
    if plan is None or (plan.row is None and not _in_tx(using)):
        return
    with _writing(using) as tx:
        _apply_identify(tx, plan)


# --- explicit calls ----------------------------------------------------------------------------


def record_track(
    instance: models.Model, event: str, properties: dict[str, Any], using: str
) -> Message:
    """Write a track ``event`` for the owner of ``instance``.

    The caller's own values are converted first: one that cannot be sent raises
    :class:`~django_cdp.payloads.PayloadError` to the caller, before any SQL, so
    the caller's transaction stays usable.
    """
    config = registry.get(type(instance))
    converted = {k: payloads.json_value(v, k) for k, v in properties.items()}
    owner, owner_error = _owner(instance, config, using)
    user_id = owner[1] if owner else None
    message_id = payloads.new_message_id()

    def make(props: dict[str, Any]) -> dict[str, Any]:
        return payloads.track_message(
            event, user_id, props, integrations=config.integrations, message_id=message_id
        )

    row = build_row(
        lambda: make(converted),
        make({}),
        instance=instance,
        source=_source(instance),
        error=owner_error,
    )
    with _writing(using) as tx:
        _store(tx, row)
    return row


def record_identify(instance: models.Model, using: str, *, force: bool) -> None:
    config = registry.get(type(instance))
    owner, owner_error = _owner(instance, config, using)
    if owner is None:
        minimal = payloads.identify_message(None, {})
        row = build_row(
            lambda: minimal, minimal, instance=instance, source=_source(instance), error=owner_error
        )
        with _writing(using) as tx:
            _store(tx, row)
        return
    instance = instance if config.is_identity else None
    _write_identify(_plan_identify(owner, using, force=force, instance=instance), using)


def guarded(action: Callable[..., None], instance: models.Model, *args: Any) -> None:
    """Run a recording step so that only database errors reach the user's save.

    A database error inside the user's transaction has already broken it and
    must propagate like any other. Failures on the user's data become failed
    rows while building (:mod:`django_cdp.rows`); anything else that escapes is
    a bug of ours, logged with the model and pk, and the save goes through:
    no block of ours is open in the user's transaction while Python that can
    fail runs, so catching it here leaves their transaction intact.
    """
    try:
        action(instance, *args)
    except (DatabaseError, validation.TrackingPlanViolation):
        raise
    except Exception:
        logger.exception(
            "django-cdp could not record a change of %s; the save went through untracked",
            describe(_source(instance)),
        )
