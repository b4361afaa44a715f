"""The signal engine: Django's model signals record changes in the outbox, in their transaction.

It captures the models the trigger engine does not (:mod:`django_cdp.capture.engines`):
on every database but PostgreSQL, and there the models whose mapping needs Python.
Every recording runs in two phases, so that our code cannot cost the user a write:

1. **Build.** Everything that is Python and may fail on the user's data runs
   first, outside any atomic block of ours: reading the values, converting
   them, resolving the owner, reading the owner's traits, the enrichment
   hook, validation, encoding and the size limit
   (:func:`django_cdp.capture.rows.build_row`).
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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.core.signals import setting_changed
from django.db import DatabaseError, connections, models
from django.db.models.signals import post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver

from django_cdp import consent, payloads, statements, validation
from django_cdp.capture import context, engines
from django_cdp.capture.engines import SIGNALS, TRIGGERS
from django_cdp.capture.owners import (
    Owner,
    apply_identify,
    owner_or_reason,
    plan_identify,
    write_identify,
)
from django_cdp.capture.rows import build_row, describe, source_of
from django_cdp.capture.state import (
    Entry,
    current,
    discard,
    in_transaction,
    insert,
    kick,
    live_entry,
    rewrite,
    store,
    writing,
)
from django_cdp.models import Message, TraitsDigest
from django_cdp.registry import CREATED, DELETED, UPDATED, ModelConfig, registry
from django_cdp.scope import tracking_active
from django_cdp.settings import SETTING_NAME

logger = logging.getLogger("django_cdp")

_BEFORE = "_django_cdp_before"
_OWNER = "_django_cdp_owner"


# --- building messages -------------------------------------------------------------------------


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
    return build_row(
        make, minimal, instance=instance, source=source_of(instance), error=owner_error
    )


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
    entry = live_entry(using, "changes", (config.label, instance.pk))
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
    entry = live_entry(using, "changes", key)
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
    owner, owner_error = owner_or_reason(instance, config, using, stored)
    cancelled = write and action == UPDATED and not changed
    if owner is not None and not consent.allows(owner[0], using):
        if write and not cancelled:
            consent.withhold(config.event_name(action), using)
        return
    row = None
    if write and not cancelled:
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
        own = instance if config.is_identity else None
        plan = plan_identify(owner, using, instance=own, consented=True)  # checked above
    in_tx = in_transaction(using)
    if plan is not None and plan.row is None and not in_tx:
        plan = None  # unchanged traits, and no transaction to remember them in
    if row is None and not cancelled and plan is None:
        return
    if not in_tx and plan is None and row is not None:
        # Autocommit and a single INSERT: atomic by itself, no BEGIN/COMMIT round trips.
        insert(row, using)
        kick(using)
        return
    with writing(using) as tx:
        if cancelled and entry is not None:  # only a change of this transaction cancels
            discard(tx, entry)
            del tx.changes[key]
        elif row is not None:
            if entry is not None:
                rewrite(tx, entry, row)
                entry.current = after
            else:
                store(tx, row)
                reference = after if action == CREATED else before.stored
                tx.changes[key] = Entry(
                    row.pk, action, tx.marker(), row.message_id, reference, after
                )
        elif entry is not None:
            entry.current = after
        if plan is not None:
            apply_identify(tx, plan)


def before_delete(instance: models.Model, config: ModelConfig, using: str) -> None:
    """Record a delete (``pre_delete``, while the row and its parents still exist)."""
    key = (config.label, instance.pk)
    entry = live_entry(using, "changes", key)
    owner, owner_error = owner_or_reason(instance, config, using)
    if owner is not None and not consent.allows(owner[0], using):
        if DELETED in config.events:
            consent.withhold(config.event_name(DELETED), using)
        return
    row = None
    if DELETED in config.events and not (entry is not None and entry.action == CREATED):
        row = _track_row(instance, config, DELETED, owner, owner_error=owner_error)
    with writing(using) as tx:
        if config.is_identity:
            tx.deleting[instance.pk] = tx.marker()
            pending = tx.live(tx.identifies, instance.pk)
            if pending is not None:
                discard(tx, pending)
                if owner is not None and owner[1]:
                    TraitsDigest.objects.using(using).forget(owner[1], pending.message_id)
                del tx.identifies[instance.pk]
        entry = tx.live(tx.changes, key)
        if entry is not None:
            discard(tx, entry)
            del tx.changes[key]
        if row is not None:
            store(tx, row)
        if config.identify and not config.is_identity and owner is not None:
            instance.__dict__[_OWNER] = owner


def after_delete(instance: models.Model, config: ModelConfig, using: str) -> None:
    """Re-identify the owner of a deleted object (``post_delete``) unless it goes too."""
    owner = instance.__dict__.pop(_OWNER, None)
    if owner is None:
        return
    tx = current(using, create=False)
    if tx is not None:
        marker = tx.deleting.get(owner[0])
        if marker is not None and tx.alive(marker):
            return
    # before_delete stashed the owner only when it had consent, in this transaction.
    write_identify(plan_identify(owner, using, consented=True), using)


# --- explicit calls ----------------------------------------------------------------------------


def record_track(
    instance: models.Model, event: str, properties: dict[str, Any], using: str
) -> Message | None:
    """Write a track ``event`` for the owner of ``instance`` (None: withheld, no consent).

    The caller's own values are converted first: one that cannot be sent raises
    :class:`~django_cdp.payloads.PayloadError` to the caller, before any SQL, so
    the caller's transaction stays usable.
    """
    config = registry.config(type(instance))
    converted = {k: payloads.json_value(v, k) for k, v in properties.items()}
    owner, owner_error = owner_or_reason(instance, config, using)
    if owner is not None and not consent.allows(owner[0], using):
        consent.withhold(event, using)
        return None
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
        source=source_of(instance),
        error=owner_error,
    )
    with writing(using) as tx:
        store(tx, row)
    return row


def record_identify(instance: models.Model, using: str, *, force: bool) -> None:
    config = registry.config(type(instance))
    owner, owner_error = owner_or_reason(instance, config, using)
    if owner is None:
        minimal = payloads.identify_message(None, {})
        row = build_row(
            lambda: minimal,
            minimal,
            instance=instance,
            source=source_of(instance),
            error=owner_error,
        )
        with writing(using) as tx:
            store(tx, row)
        return
    own = instance if config.is_identity else None
    write_identify(plan_identify(owner, using, force=force, instance=own), using)


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
            describe(source_of(instance)),
        )


# --- receivers ---------------------------------------------------------------------------------
#
# Connected per registered model (``sender=model``), never to every model: a ``pre_delete``
# listener on all models would disable Django's fast deletes project-wide. ``connect()`` runs
# in ``AppConfig.ready()`` and again whenever ``DJANGO_CDP`` changes (``override_settings``).

_connected: list[type[models.Model]] = []


def _captured(sender: type[models.Model], using: str) -> ModelConfig | None:
    """The config of a model whose change on ``using`` this engine records now, or None
    (not registered, tracking off, or captured by triggers on that database)."""
    config = registry.get(sender)
    if config is None or not tracking_active() or engines.engine_for(sender, using) != SIGNALS:
        return None
    return config


def _pre_save(sender, instance, raw, using, update_fields, **kwargs: Any) -> None:
    if raw:
        # Fixtures (loaddata) are not changes: silence the triggers for this save too.
        context.raw_save(using, True)
        return
    config = _captured(sender, using)
    if config is not None:
        guarded(before_save, instance, config, using, update_fields)


def _post_save(sender, instance, created, raw, using, **kwargs: Any) -> None:
    if raw:
        context.raw_save(using, False)
        return
    config = _captured(sender, using)
    if config is None:
        forget_before(instance)
        return
    guarded(after_save, instance, config, created, using)


def _pre_delete(sender, instance, using, **kwargs: Any) -> None:
    config = _captured(sender, using)
    if config is not None:
        guarded(before_delete, instance, config, using)


def _post_delete(sender, instance, using, **kwargs: Any) -> None:
    config = _captured(sender, using)
    if config is not None:
        guarded(after_delete, instance, config, using)


_RECEIVERS = (
    (pre_save, _pre_save),
    (post_save, _post_save),
    (pre_delete, _pre_delete),
    (post_delete, _post_delete),
)


def connect() -> None:
    """Connect the receivers to every registered model.

    A model captured by triggers on every database gets only the save receivers,
    which keep fixtures silent; no delete receiver, so it keeps Django's fast
    deletes (a ``pre_delete`` listener would turn them off).
    """
    disconnect()
    for config in registry:
        triggers_only = all(
            engines.engine_for(config.model, alias) == TRIGGERS for alias in connections
        )
        for signal, func in _RECEIVERS:
            if triggers_only and signal in (pre_delete, post_delete):
                continue
            signal.connect(
                func, sender=config.model, weak=False, dispatch_uid=_uid(func, config.model)
            )
        _connected.append(config.model)


def disconnect() -> None:
    while _connected:
        model = _connected.pop()
        for signal, func in _RECEIVERS:
            signal.disconnect(sender=model, dispatch_uid=_uid(func, model))


def _uid(func, model: type[models.Model]) -> str:
    return f"django_cdp.{func.__name__}.{model._meta.label_lower}"


@receiver(setting_changed)
def _reconnect_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        connect()
