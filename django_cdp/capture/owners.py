"""Owners and their identifies: whose message it is, and when they are identified again.

An owner is the identity row a change belongs to (its pk and userId). After a
change its traits are read from the database with the digest of the last
identify recorded for the user, and an identify is written only when they
differ (at most once per transaction, with the final traits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, models
from django.db.models import Subquery

from django_cdp import payloads
from django_cdp.capture.rows import build_row
from django_cdp.capture.state import (
    Entry,
    Transaction,
    in_transaction,
    live_entry,
    rewrite,
    store,
    writing,
)
from django_cdp.models import Message, TraitsDigest
from django_cdp.registry import ModelConfig, registry
from django_cdp.settings import cdp_settings

Owner = tuple[Any, str | None]  # (pk of the identity row, userId)


def user_id_of(value: Any) -> str | None:
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
        return instance.pk, user_id_of(getattr(instance, identity.user_id_field.attname))
    attname = config.owner_attname
    if attname is not None and identity.user_id_is_pk:
        owner_pk = stored[attname] if stored and attname in stored else getattr(instance, attname)
        return None if owner_pk is None else (owner_pk, user_id_of(owner_pk))
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
    return row[0], user_id_of(row[1])


def owner_or_reason(
    instance: models.Model, config: ModelConfig, using: str, stored: dict | None = None
) -> tuple[Owner | None, str]:
    """:func:`resolve_owner`, with a failure turned into a reason (database errors propagate)."""
    try:
        return resolve_owner(instance, config, using, stored), ""
    except DatabaseError:
        raise
    except Exception as exc:
        return None, f"owner: {type(exc).__name__}: {exc}"


def read_traits(owner: Owner, using: str, instance: models.Model | None):
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
class Identify:
    """A planned identify: built before any write, applied in the write phase."""

    owner: Owner
    digest: str  # "" when the traits could not be built
    row: Message | None  # None: unchanged, only remembered
    entry: Entry | None


def plan_identify(
    owner: Owner, using: str, *, force: bool = False, instance: models.Model | None = None
) -> Identify | None:
    """Identify an owner with its current traits, at most once per transaction.

    Skipped when the traits equal the last identify recorded for the user
    (in this transaction, or in ``TraitsDigest``), unless ``force`` or
    ``SEND_UNCHANGED_IDENTIFY``. An owner that was never identified (created
    before tracking, or by ``bulk_create``) or whose traits changed behind the
    ORM has a different digest, so it is identified.
    """
    read = read_traits(owner, using, instance)
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
    entry = live_entry(using, "identifies", owner[0])
    if entry is not None:
        if digest and entry.digest == digest and not (force and entry.row_id is None):
            return None
    elif digest and digest == stored and not (force or cdp_settings.SEND_UNCHANGED_IDENTIFY):
        return Identify(owner, digest, None, None)
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
    return Identify(owner, digest, row, entry)


def apply_identify(tx: Transaction, plan: Identify) -> None:
    owner_pk, user_id = plan.owner
    if plan.row is None:
        tx.identifies[owner_pk] = Entry(None, "identify", tx.marker(), digest=plan.digest)
        return
    row, entry = plan.row, plan.entry
    if entry is not None and entry.row_id is not None:
        rewrite(tx, entry, row)
        entry.digest = plan.digest
    else:
        store(tx, row)
        tx.identifies[owner_pk] = Entry(
            row.pk, "identify", tx.marker(), row.message_id, digest=plan.digest
        )
    digests = TraitsDigest.objects.using(tx.using)
    if row.status == Message.Status.PENDING:
        digests.upsert([(user_id, plan.digest, row.message_id)])
    elif entry is not None:
        # An earlier version of this identify recorded its digest; this one is not sent.
        digests.forget(user_id, message_id=row.message_id)


def write_identify(plan: Identify | None, using: str) -> None:
    """The write phase of an identify planned on its own."""
    if plan is None or (plan.row is None and not in_transaction(using)):
        return
    with writing(using) as tx:
        apply_identify(tx, plan)
