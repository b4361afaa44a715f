"""Retention: delete delivered messages after a while, and everything about one user on request.

The outbox is also the delivery log, so sent rows pile up: at a few events per
merchant per day a busy project writes millions of rows a month. Only rows
whose fate is settled and harmless to forget are purged by age: ``sent``
(accepted by the data plane) and ``skipped`` (recorded while ``SEND`` was off).
``pending`` rows are still to be delivered, ``failed`` ones are dead letters
someone has to look at, and ``blocked`` ones are tracking-plan violations kept
for review: none of them is ever purged by age.

Deletes go in batches of consecutive ids (``id > last AND id <= upper``, the
upper bound found with one indexed query), each its own short transaction, so a
purge of millions of rows never holds one huge transaction or lock. A message's
delivery attempts (``DeliveryAttempt``, ``CASCADE``) go with it: in each
batch's transaction Django's collector reads the batch's ids (only the ids, not
the payloads), then deletes their attempts and the messages by id.

An erasure request (GDPR art. 17 and the like) is different: everything stored
about one userId goes, whatever its status, together with the user's traits
digest. The copies already delivered live in the data plane and its
destinations, which have their own deletion APIs: :data:`ERASURE_NOTICE`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import QuerySet, signals
from django.utils import timezone

from django_cdp.models import Message, TraitsDigest

#: Statuses purged by age. Never pending, failed or blocked.
PURGEABLE = (Message.Status.SENT, Message.Status.SKIPPED)

#: Rows per DELETE statement.
BATCH_SIZE = 5000

ERASURE_NOTICE = (
    "django-cdp deleted only its own copy. Messages already delivered are stored by the "
    "data plane and every destination behind it: file a deletion request there too "
    "(RudderStack: Data Regulation API, regulationType 'suppress_with_delete'; Segment: "
    "Public API regulations, 'SUPPRESS_WITH_DELETE'), and delete or anonymise the customer "
    "in your own tables, or their next change identifies them again."
)


@dataclass
class PurgeResult:
    deleted: int = 0
    batches: int = 0


@dataclass
class ErasureResult:
    messages: int = 0
    digests: int = 0


def purgeable(older_than: datetime.timedelta, *, using: str = DEFAULT_DB_ALIAS) -> QuerySet:
    """Sent and skipped messages written more than ``older_than`` ago."""
    cutoff = timezone.now() - older_than
    return Message.objects.using(using).filter(status__in=PURGEABLE, created_at__lt=cutoff)


def purge(
    older_than: datetime.timedelta,
    *,
    using: str = DEFAULT_DB_ALIAS,
    batch_size: int = BATCH_SIZE,
    dry_run: bool = False,
) -> PurgeResult:
    """Delete sent and skipped messages older than ``older_than``, ``batch_size`` per DELETE.

    With ``dry_run`` it counts instead (one ``COUNT(*)``). The cutoff is fixed
    when the purge starts; the status and age conditions are repeated in every
    batch, so only rows that are sent or skipped when their batch runs go (those
    statuses are final: nothing moves a row out of them).
    """
    queryset = purgeable(older_than, using=using)
    result = PurgeResult()
    if dry_run:
        result.deleted = queryset.count()
        return result
    last = 0
    while True:
        upper = (
            queryset.filter(id__gt=last)
            .order_by("id")
            .values_list("id", flat=True)[batch_size - 1 : batch_size]
            .first()
        )
        window = queryset.filter(id__gt=last)
        if upper is not None:
            window = window.filter(id__lte=upper)
        with transaction.atomic(using=using):
            result.deleted += _delete_messages(window)
        result.batches += 1
        if upper is None:
            return result
        last = upper


def erase_user(
    user_id: str, *, using: str = DEFAULT_DB_ALIAS, dry_run: bool = False
) -> ErasureResult:
    """Delete every message of ``user_id`` (any status) and its traits digest, in one transaction.

    Pending messages go too: an erased user's data must not be sent after the
    request. One that a worker is sending at this very moment may still arrive;
    the data plane's deletion request (:data:`ERASURE_NOTICE`) covers it.
    """
    messages = Message.objects.using(using).filter(user_id=user_id)
    digests = TraitsDigest.objects.using(using).filter(user_id=user_id)
    if dry_run:
        return ErasureResult(messages.count(), digests.count())
    with transaction.atomic(using=using):
        deleted_messages = _delete_messages(messages)
        deleted_digests, _ = digests.delete()
    return ErasureResult(deleted_messages, deleted_digests)


def _delete_messages(queryset: QuerySet) -> int:
    """Delete the messages of ``queryset`` with their delivery attempts; the messages deleted.

    The cascade makes Django's collector load the messages before deleting them;
    it needs only their ids, so the payloads are left unread unless a
    ``pre_delete``/``post_delete`` receiver may want whole objects (the rule Django
    applies to the related rows itself). The count is of messages only
    (``QuerySet.delete()`` totals every model it deleted rows of).
    """
    if not (
        signals.pre_delete.has_listeners(Message) or signals.post_delete.has_listeners(Message)
    ):
        queryset = queryset.only("id")
    _, per_model = queryset.delete()
    return per_model.get(Message._meta.label, 0)
