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

Erasure wins over delivery. A worker holds no lock while it sends (its claim is
a lease stored in the rows), so deleting the rows alone cannot stop a request
that is about to start or already running. Two things close that gap:
delivery re-reads its claimed rows by id right before each request and leaves
out the ones that vanished, and every request ends before its claim's lease
does (:mod:`django_cdp.delivery`). So erasure deletes the rows, and if a worker
had claimed some of them it waits until those leases end: when
:func:`erase_user` returns, no request carrying the user's messages is running
or will start. A request already under way when the erasure committed may have
reached the data plane before its deadline; the data plane's deletion request
covers that copy like any other delivered one.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import QuerySet, signals
from django.db.models.functions import Now
from django.utils import timezone

from django_cdp.capture import deferred
from django_cdp.models import Message, TraitsDigest

logger = logging.getLogger("django_cdp.retention")

#: Statuses purged by age: done with. Never pending, failed or blocked.
PURGEABLE = (Message.Status.SENT, Message.Status.SKIPPED, Message.Status.SUPERSEDED)

#: Rows per DELETE statement.
BATCH_SIZE = 5000

#: Seconds erasure waits past the end of a claim's lease. A worker's request ends when
#: its deadline timer fires, which on a busy host can be late by some milliseconds, and
#: tearing the connection down takes a moment more; this keeps "the lease has ended"
#: meaning "its request has ended". (A module constant, not a setting: nobody needs to tune it.)
ERASURE_GRACE_SECONDS = 1.0

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
    #: Of ``messages``, how many a worker had claimed for delivery (lease not yet over).
    in_flight: int = 0
    #: Seconds until the last of those leases ended: what erasure waited, or with
    #: ``wait=False`` how long a request carrying them may still run.
    in_flight_seconds: float = 0.0


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
    batch, so only rows that are sent, skipped or superseded when their batch runs go (those
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
    user_id: str, *, using: str = DEFAULT_DB_ALIAS, dry_run: bool = False, wait: bool = True
) -> ErasureResult:
    """Delete every message of ``user_id`` (any status) and its traits digest, in one transaction.

    Pending messages go too: an erased user's data must not be sent after the
    request. If a worker had claimed some of them, erasure then waits (without
    holding a lock) until those claims' leases end, by the database clock (plus
    :data:`ERASURE_GRACE_SECONDS`); no
    request carrying them runs past its lease, and a worker leaves erased rows
    out of its next request. So when this returns, none of the user's messages
    is being sent or will be. With ``wait=False`` it returns at once and
    ``in_flight_seconds`` says how long a request may still be running.
    """
    messages = Message.objects.using(using).filter(user_id=user_id)
    digests = TraitsDigest.objects.using(using)
    if dry_run:
        return ErasureResult(messages.count(), digests.filter(user_id=user_id).count())
    # The user's events in statements the triggers deferred become messages first, so that
    # they go with the others (deferred.expand waits for a worker expanding meanwhile).
    deferred.expand(using, wait=True)
    with transaction.atomic(using=using):
        in_flight, seconds = _leases(messages)
        deleted_messages = _delete_messages(messages)
        deleted_digests = digests.forget(user_id)
    result = ErasureResult(deleted_messages, deleted_digests, in_flight, seconds)
    if in_flight:
        wait_seconds = seconds + ERASURE_GRACE_SECONDS
        logger.warning(
            "django-cdp: erasure of userId %r: %d message(s) were claimed by a delivery worker; "
            "%s %.1f s for the claim's lease to end, after which no request carrying them runs",
            user_id,
            in_flight,
            "waiting" if wait else "not waiting",
            wait_seconds,
        )
        if wait:
            time.sleep(wait_seconds)
    return result


def _leases(messages: QuerySet) -> tuple[int, float]:
    """How many of ``messages`` are leased to a worker, and seconds until the last lease ends.

    Locks all of them (PostgreSQL), so that no claim can take one between this
    read and the delete; the claim's ``SKIP LOCKED`` passes them over meanwhile.
    """
    rows = messages.select_for_update().annotate(db_now=Now()).values_list("locked_until", "db_now")
    left = [
        (until - now).total_seconds() for until, now in rows if until is not None and until > now
    ]
    return len(left), max(left, default=0.0)


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
