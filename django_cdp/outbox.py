"""Writing messages to the outbox, in the transaction of the change they describe.

Every write happens inside ``atomic(savepoint=False)`` on the alias of the
change: inside the user's transaction it adds no savepoint and commits or rolls
back with the change; in autocommit it is a short transaction of its own.

Within one transaction the writer coalesces: one event per object (several
saves give one message with the final values; create then update is one
``Created``; update then delete only ``Deleted``; create then delete nothing)
and at most one identify per owner, with the final traits. It remembers what
it wrote per transaction and per savepoint: each savepoint level in which it
wrote registers a no-op ``on_commit`` marker, and Django discards the markers
of a savepoint that rolls back, so an entry whose marker is gone was rolled
back with its rows and is forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import DatabaseError, connections, models, transaction
from django.db.models import Subquery
from django.utils import timezone

from django_cdp import payloads, statements, validation
from django_cdp.models import Message, TraitsDigest
from django_cdp.registry import CREATED, DELETED, UPDATED, ModelConfig, registry
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
    # For changes: attname -> value to compare the final state with.
    reference: dict[str, Any] = field(default_factory=dict)
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
    """The state of the open transaction on ``using`` (call inside an atomic block)."""
    connection = connections[using]
    state = connection.__dict__.get(_STATE)
    if state is not None and state.alive(state.root):
        return state
    if not create or not connection.in_atomic_block:
        return None
    state = _Transaction(using)
    connection.__dict__[_STATE] = state
    return state


# --- rows --------------------------------------------------------------------------------------


def _insert(
    using: str,
    message: dict[str, Any],
    *,
    instance: models.Model | None,
    source: tuple[type[models.Model], Any],
) -> Message:
    """Insert one message row, failed at once when it can never be sent."""
    row = message_row(message, instance=instance, source=source)
    if row.status == Message.Status.FAILED:
        logger.error(
            "django-cdp: %s message %s for %s pk=%r is not sendable: %s",
            row.type,
            row.message_id,
            source[0]._meta.label,
            source[1],
            row.last_error,
        )
    statements.insert_message(row, using)
    if message_created.has_listeners(Message):
        message_created.send(sender=Message, message=row)
    return row


def _store(
    tx: _Transaction,
    message: dict[str, Any],
    *,
    instance: models.Model | None,
    source: tuple[type[models.Model], Any],
) -> Message:
    """Insert a row in the open transaction, which then asks for delivery after commit."""
    row = _insert(tx.using, message, instance=instance, source=source)
    tx.wrote = True
    return row


def _kick(using: str) -> None:
    """Ask for delivery of what was just committed (never raises)."""
    from django_cdp.delivery import request_delivery

    request_delivery(using)


def _rewrite(tx: _Transaction, entry: _Entry, message: dict[str, Any], instance) -> None:
    """Replace the payload of a row written earlier in this transaction (same messageId)."""
    message["messageId"] = entry.message_id
    message = payloads.enrich(message, instance)
    verdict = validation.validate(message)
    Message.objects.using(tx.using).filter(pk=entry.row_id).update(
        payload=payloads.encode(message),
        event=message.get("event", ""),
        **validation.rewrite_fields(verdict),
    )


def _discard(tx: _Transaction, entry: _Entry) -> None:
    if entry.row_id is not None:
        Message.objects.using(tx.using).filter(pk=entry.row_id).delete()


def _source(instance: models.Model) -> tuple[type[models.Model], Any]:
    return type(instance), instance.pk


def _describe(instance: models.Model | None) -> str:
    if instance is None:
        return "(no object)"
    return f"{instance._meta.label} pk={instance.pk!r}"


# --- change detection --------------------------------------------------------------------------


def _comparable(config: ModelConfig, attname: str, value: Any) -> Any:
    field = config.column_fields[attname]
    try:
        return field.to_python(value)
    except ValidationError:
        return value


def columns_to_compare(config: ModelConfig, update_fields: frozenset[str] | None) -> list[str]:
    columns = list(config.tracked_columns)
    if update_fields is not None:
        names = {
            f.attname
            for f in config.model._meta.concrete_fields
            if f.name in update_fields or f.attname in update_fields
        }
        columns = [c for c in columns if c in names]
    return columns


def before_save(
    instance: models.Model,
    config: ModelConfig,
    using: str,
    update_fields: frozenset[str] | None,
) -> None:
    """Remember the tracked columns as they are before an update (``pre_save``).

    A narrow read of only those columns, skipped when the object is new, when
    ``update_fields`` touches none of them, or when this transaction already
    knows the reference values.
    """
    if UPDATED not in config.events or instance._state.adding or instance.pk is None:
        return
    columns = columns_to_compare(config, update_fields)
    if not columns:
        instance.__dict__[_BEFORE] = {}
        return
    tx = _current(using, create=False)
    entry = tx.live(tx.changes, (config.label, instance.pk)) if tx is not None else None
    if entry is not None:
        instance.__dict__[_BEFORE] = entry.reference
        return
    row = statements.read_columns(config.model, using, instance.pk, tuple(columns))
    if row is not None:
        instance.__dict__[_BEFORE] = dict(zip(columns, row, strict=True))


def remember_before(instance: models.Model, values: dict[str, Any]) -> None:
    """Give ``after_save`` the old column values of an update made without ``pre_save``."""
    instance.__dict__[_BEFORE] = values


def forget_before(instance: models.Model) -> None:
    instance.__dict__.pop(_BEFORE, None)


def _changed(instance: models.Model, config: ModelConfig, reference: dict[str, Any]) -> list[str]:
    """Property names whose source columns differ from ``reference``, in mapping order."""
    columns = {
        attname
        for attname, old in reference.items()
        if _comparable(config, attname, getattr(instance, attname)) != old
    }
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


def _track(
    instance: models.Model,
    config: ModelConfig,
    action: str,
    owner: Owner | None,
    changed: list[str] | None = None,
) -> dict[str, Any]:
    properties = payloads.properties_of(instance, config)
    if changed is not None:
        properties["changed_fields"] = changed
    return payloads.track_message(
        config.event_name(action),
        owner[1] if owner else None,
        properties,
        integrations=config.integrations,
    )


def _reidentifies(config: ModelConfig) -> bool:
    """Whether a change of this model re-identifies its owner.

    Only when the change can alter the owner's traits (``can_change_traits``): a
    Payout save cannot change a shop's columns, so reading them back would only
    find the recorded digest equal; that saves a query per change. With
    ``SEND_UNCHANGED_IDENTIFY`` every change sends an identify, so it always reads.
    """
    return config.identify and (config.can_change_traits or cdp_settings.SEND_UNCHANGED_IDENTIFY)


def after_save(instance: models.Model, config: ModelConfig, created: bool, using: str) -> None:
    """Record a create or update (``post_save``), coalescing within the transaction."""
    before = instance.__dict__.pop(_BEFORE, None)
    key = (config.label, instance.pk)
    state = _current(using, create=False)
    entry = state.live(state.changes, key) if state is not None else None
    if created or (entry is not None and entry.action == CREATED):
        action = CREATED
        changed = _changed(instance, config, entry.reference) if entry is not None else None
        write = CREATED in config.events and (entry is None or bool(changed))
    elif before is not None:
        action = UPDATED
        changed = _changed(instance, config, before)
        # With an earlier Updated in this transaction, no net change means dropping it.
        write = bool(changed) or entry is not None
    else:
        write = False
    if not (write or config.is_identity):
        return
    owner = resolve_owner(instance, config, using)
    reidentifies = owner is not None and (config.is_identity or (write and _reidentifies(config)))
    if not (write or reidentifies):
        return
    if not reidentifies and not connections[using].in_atomic_block:
        # Autocommit and a single INSERT: atomic by itself, no BEGIN/COMMIT round trips to pay.
        message = _track(instance, config, action, owner, changed if action == UPDATED else None)
        _insert(using, message, instance=instance, source=_source(instance))
        _kick(using)
        return
    with transaction.atomic(using=using, savepoint=False):
        tx = _current(using)
        if write and action == UPDATED and not changed:
            _discard(tx, entry)
            del tx.changes[key]
        elif write:
            message = _track(
                instance, config, action, owner, changed if action == UPDATED else None
            )
            if entry is not None:
                _rewrite(tx, entry, message, instance)
                if action == CREATED:
                    entry.reference = _snapshot(instance, config)
            else:
                row = _store(tx, message, instance=instance, source=_source(instance))
                reference = _snapshot(instance, config) if action == CREATED else before
                tx.changes[key] = _Entry(row.pk, action, tx.marker(), row.message_id, reference)
        if reidentifies:
            reidentify(tx, owner, instance=instance if config.is_identity else None)


def before_delete(instance: models.Model, config: ModelConfig, using: str) -> None:
    """Record a delete (``pre_delete``, while the row and its parents still exist)."""
    with transaction.atomic(using=using, savepoint=False):
        tx = _current(using)
        owner = resolve_owner(instance, config, using)
        if config.is_identity:
            tx.deleting[instance.pk] = tx.marker()
            pending = tx.live(tx.identifies, instance.pk)
            if pending is not None:
                _discard(tx, pending)
                TraitsDigest.objects.using(using).filter(
                    user_id=owner[1] if owner else "", message_id=pending.message_id
                ).delete()
                del tx.identifies[instance.pk]
        key = (config.label, instance.pk)
        entry = tx.live(tx.changes, key)
        if entry is not None:
            _discard(tx, entry)
            del tx.changes[key]
            if entry.action == CREATED:
                return  # created and deleted in one transaction: nothing happened
        if DELETED in config.events:
            _store(
                tx,
                _track(instance, config, DELETED, owner),
                instance=instance,
                source=_source(instance),
            )
            if _reidentifies(config) and not config.is_identity and owner is not None:
                instance.__dict__[_OWNER] = owner


def after_delete(instance: models.Model, config: ModelConfig, using: str) -> None:
    """Re-identify the owner of a deleted object (``post_delete``) unless it goes too."""
    owner = instance.__dict__.pop(_OWNER, None)
    if owner is None:
        return
    with transaction.atomic(using=using, savepoint=False):
        tx = _current(using)
        marker = tx.deleting.get(owner[0])
        if marker is not None and tx.alive(marker):
            return
        reidentify(tx, owner)


# --- owners and identifies ---------------------------------------------------------------------


def _user_id(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def resolve_owner(instance: models.Model, config: ModelConfig, using: str) -> Owner | None:
    """The owning identity row of an object: its pk and userId, or None when it has none.

    One foreign key away with the pk as userId, both come from memory; otherwise
    one query follows the owner path.
    """
    identity = registry.identity
    if config.is_identity:
        return instance.pk, _user_id(getattr(instance, identity.user_id_field.attname))
    attname = config.owner_attname
    if attname is not None and identity.user_id_is_pk:
        owner_pk = getattr(instance, attname)
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


def _read_traits(
    owner: Owner, using: str, instance: models.Model | None
) -> tuple[dict[str, Any], str | None] | None:
    """The owner's current traits and the digest last recorded for it, in one query."""
    identity = registry.identity
    digest = Subquery(
        TraitsDigest.objects.using(using).filter(user_id=owner[1]).values("digest")[:1]
    )
    queryset = identity.model._base_manager.using(using).filter(pk=owner[0])
    queryset = queryset.annotate(django_cdp_digest=digest)
    if identity.needs_instance:
        if instance is not None:
            # Properties and methods compute from the instance in hand.
            stored = (
                TraitsDigest.objects.using(using)
                .filter(user_id=owner[1])
                .values_list("digest", flat=True)
                .first()
            )
            return payloads.read_sources(instance, identity.traits), stored
        obj = payloads.joined_for(queryset, identity.traits).first()
        if obj is None:
            return None
        return payloads.read_sources(obj, identity.traits), obj.django_cdp_digest
    row = queryset.values(*identity.trait_paths, "django_cdp_digest").first()
    if row is None:
        return None
    traits = {s.name: payloads.json_value(row[s.path], s.name) for s in identity.traits}
    return traits, row["django_cdp_digest"]


def reidentify(tx: _Transaction, owner: Owner, *, force: bool = False, instance=None) -> None:
    """Identify an owner with its current traits, at most once per transaction.

    Skipped when the traits equal the last identify recorded for the user,
    unless ``force`` or ``SEND_UNCHANGED_IDENTIFY``.
    """
    read = _read_traits(owner, tx.using, instance)
    if read is None:
        return
    traits, stored = read
    digest = payloads.traits_digest(traits)
    entry = tx.live(tx.identifies, owner[0])
    if entry is not None:
        if entry.digest == digest and not (force and entry.row_id is None):
            return
    elif digest == stored and not (force or cdp_settings.SEND_UNCHANGED_IDENTIFY):
        tx.identifies[owner[0]] = _Entry(None, "identify", tx.marker(), digest=digest)
        return
    message = payloads.identify_message(owner[1], traits)
    if entry is not None and entry.row_id is not None:
        _rewrite(tx, entry, message, instance)
        message_id = entry.message_id
        entry.digest = digest
    else:
        row = _store(tx, message, instance=instance, source=(registry.identity.model, owner[0]))
        message_id = row.message_id
        tx.identifies[owner[0]] = _Entry(row.pk, "identify", tx.marker(), message_id, digest=digest)
        if row.status != Message.Status.PENDING:
            return
    TraitsDigest.objects.using(tx.using).bulk_create(
        [
            TraitsDigest(
                user_id=owner[1], digest=digest, message_id=message_id, updated_at=timezone.now()
            )
        ],
        update_conflicts=True,
        unique_fields=["user_id"],
        update_fields=["digest", "message_id", "updated_at"],
    )


# --- explicit calls ----------------------------------------------------------------------------


def record_track(
    instance: models.Model, event: str, properties: dict[str, Any], using: str
) -> Message:
    config = registry.get(type(instance))
    with transaction.atomic(using=using, savepoint=False):
        tx = _current(using)
        owner = resolve_owner(instance, config, using)
        converted = {k: payloads.json_value(v, k) for k, v in properties.items()}
        message = payloads.track_message(
            event, owner[1] if owner else None, converted, integrations=config.integrations
        )
        return _store(tx, message, instance=instance, source=_source(instance))


def record_identify(instance: models.Model, using: str, *, force: bool) -> None:
    config = registry.get(type(instance))
    with transaction.atomic(using=using, savepoint=False):
        tx = _current(using)
        owner = resolve_owner(instance, config, using)
        if owner is None:
            _store(
                tx,
                payloads.identify_message(None, {}),
                instance=instance,
                source=_source(instance),
            )
            return
        reidentify(tx, owner, force=force, instance=instance if config.is_identity else None)


def guarded(action: Callable[..., None], instance: models.Model, *args: Any) -> None:
    """Run a recording step so that only database errors reach the user's save.

    A database error inside the user's transaction has already broken it and
    must propagate like any other; anything else (a value that cannot be
    converted, a failing enrichment hook) is logged with the model and pk.
    """
    try:
        action(instance, *args)
    except (DatabaseError, validation.TrackingPlanViolation):
        raise
    except Exception:
        logger.exception(
            "django-cdp could not record a change of %s; the save went through untracked",
            _describe(instance),
        )


# --- helpers for bulk writers and tests ---------------------------------------------------------


def message_row(
    message: dict[str, Any],
    *,
    instance: models.Model | None,
    source: tuple[type[models.Model], Any],
) -> Message:
    """An unsaved outbox row for ``message``: one place for what every write applies.

    The ``ENRICH_MESSAGE`` hook runs, the message is validated against the
    tracking plan, the text is encoded once, and a message that can never be
    sent (no userId, over ``MAX_MESSAGE_BYTES``) is marked failed with its
    reason (a blocked violation, blocked). :func:`_store` saves it; bulk writers
    (``cdp_backfill_identify``) ``bulk_create`` many.
    """
    message = payloads.enrich(message, instance)
    verdict = validation.validate(message)  # raises TrackingPlanViolation in "raise" mode
    text = payloads.encode(message)
    status, error = Message.Status.PENDING, ""
    size = len(text.encode())
    if not message.get("userId"):
        status, error = Message.Status.FAILED, "no userId"
    elif size > cdp_settings.MAX_MESSAGE_BYTES:
        status = Message.Status.FAILED
        error = f"too large ({size} > {cdp_settings.MAX_MESSAGE_BYTES} bytes)"
    elif verdict.blocked:
        status, error = Message.Status.BLOCKED, verdict.summary
    return Message(
        message_id=message["messageId"],
        type=message["type"],
        event=message.get("event", ""),
        user_id=message.get("userId") or "",
        payload=text,
        status=status,
        last_error=error,
        source_model=source[0]._meta.label_lower,
        source_pk=str(source[1]),
        violations=verdict.violations,
    )


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
