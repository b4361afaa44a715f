"""Owners and their identifies: whose message it is, and when they are identified again.

An owner is the identity row a change belongs to (its pk and userId). After a
change its traits are read from the database with the digest of the last
identify recorded for the user, and an identify is written only when they
differ (at most once per transaction, with the final traits).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import DatabaseError, connections, models
from django.db.models import Subquery

from django_cdp import consent, payloads
from django_cdp.capture import sql
from django_cdp.capture.engines import identity_blocker
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
from django_cdp.registry import IdentityConfig, ModelConfig, registry
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
    identity = registry.configured_identity
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


@dataclass(frozen=True)
class Traits:
    """An owner's traits as the database holds them, and whether they changed."""

    values: dict[str, Any] | None  # None when a value cannot be sent
    error: str  # why not ("score: inf is not a JSON number")
    digest: str  # "" when the values cannot be sent
    stored: str | None  # the digest of the last identify recorded for the user
    user_id: str | None = None  # the owner's userId, where it was read with the traits


def in_database(using: str) -> bool:
    """Whether the database computes traits and their digest (PostgreSQL, and every trait a
    field or a path): the trigger engine does there, so the signal engine must too."""
    identity = registry.configured_identity
    return connections[using].vendor == "postgresql" and identity_blocker(identity) is None


@functools.lru_cache(maxsize=16)
def _traits_query(identity: IdentityConfig, using: str) -> str:
    """The SQL of :func:`traits_batch`, written once per identity configuration and database."""
    connection = connections[using]
    digests = connection.ops.quote_name(TraitsDigest._meta.db_table)
    return sql.traits_query(sql.Builder(connection), identity, digests)


def traits_batch(pks: list[Any], using: str) -> dict[str, Traits]:
    """Owners' traits and digests computed in the database, one query: pk text -> traits."""
    with connections[using].cursor() as cursor:
        query = _traits_query(registry.configured_identity, using)
        cursor.execute(query, [[str(pk) for pk in pks]])
        rows = cursor.fetchall()
    out = {}
    for pk, uid, text, error, digest, stored in rows:
        if error:
            out[pk] = Traits(None, error, "", stored, uid)
        else:
            out[pk] = Traits(json.loads(text, parse_float=Decimal), "", digest, stored, uid)
    return out


def read_traits(owner: Owner, using: str, instance: models.Model | None) -> Traits | None:
    """The owner's current traits, their digest, and the digest last recorded for the user.

    One query. On PostgreSQL (every trait a field or a path) the database
    computes them, as the triggers do, so both engines agree on the digest;
    elsewhere they are read with the ORM and converted in Python, and a
    property or method computes from the instance in hand. None when the owner
    row is gone.
    """
    identity = registry.configured_identity
    if in_database(using):
        return traits_batch([owner[0]], using).get(str(owner[0]))
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
            stored = (
                TraitsDigest.objects.using(using)
                .filter(user_id=owner[1])
                .values_list("digest", flat=True)
                .first()
            )
        return traits_from(lambda: payloads.read_sources(instance, identity.traits), stored)
    row = queryset.values(*identity.trait_paths, "django_cdp_digest").first()
    if row is None:
        return None
    return traits_from(lambda: payloads.values_of(row, identity.traits), row["django_cdp_digest"])


def traits_from(
    read: Callable[[], dict[str, Any]], stored: str | None, user_id: str | None = None
) -> Traits:
    """Traits converted in Python (``read`` raises ``PayloadError`` for a value with no JSON
    form), with their digest."""
    try:
        values = read()
    except payloads.PayloadError as exc:
        return Traits(None, str(exc), "", stored, user_id)
    return Traits(values, "", payloads.traits_digest(values), stored, user_id)


@dataclass
class Identify:
    """A planned identify: built before any write, applied in the write phase."""

    owner: Owner
    digest: str  # "" when the traits could not be built
    row: Message | None  # None: unchanged, only remembered
    entry: Entry | None


def plan_identify(
    owner: Owner,
    using: str,
    *,
    force: bool = False,
    instance: models.Model | None = None,
    consented: bool = False,
) -> Identify | None:
    """Identify an owner with its current traits, at most once per transaction.

    Skipped when the traits equal the last identify recorded for the user
    (in this transaction, or in ``TraitsDigest``), unless ``force`` or
    ``SEND_UNCHANGED_IDENTIFY``. An owner that was never identified (created
    before tracking, or by ``bulk_create``) or whose traits changed behind the
    ORM has a different digest, so it is identified. An owner without consent
    (``CONSENT``) is not identified at all; ``consented`` says the caller has just
    checked it for this change, so that a save reads consent once.
    """
    if not consented and not consent.allows(owner[0], using):
        return None
    read = read_traits(owner, using, instance)
    if read is None:
        return None
    traits, error, digest, stored = read.values, read.error, read.digest, read.stored
    source = (registry.configured_identity.model, owner[0])
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
        # traits is None only with an error, and then build_row keeps ``minimal``.
        lambda: payloads.identify_message(owner[1], traits or {}, message_id=message_id),
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
    if user_id is None:
        return  # a message without a userId is stored failed: no digest to keep
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
