"""Deferred statements: large statements the capture triggers stored whole, turned into messages.

A statement that changes at least ``DEFER_STATEMENT_ROWS`` rows of a model whose messages
say only what is on the row (:func:`django_cdp.capture.triggers.deferrable`) costs its
transaction one :class:`~django_cdp.models.DeferredStatement` row instead of a message per
row, with their index entries and JSON. The messages are written later by the generated
functions, from the stored rows, exactly as the trigger would have written them:

* by a later tracked statement of the same transaction, before its own messages (so the
  rules of one transaction hold across both);
* by delivery (:func:`expand`), before it claims the next batch, for committed ones;
* by ``cdp_triggers install`` / ``uninstall``, before the functions change or go.
"""

from __future__ import annotations

import logging

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from django_cdp.capture.triggers import expand_pending
from django_cdp.models import DeferredStatement

logger = logging.getLogger("django_cdp")

#: The advisory lock one expanding process holds (``'cdpx'`` in ASCII): two workers never
#: expand the same statements, and the second goes on claiming at once.
LOCK_KEY = 0x63647078


def pending(using: str = DEFAULT_DB_ALIAS) -> int:
    """How many deferred statements wait to become messages on ``using``."""
    return DeferredStatement.objects.using(using).count()


def expand(using: str = DEFAULT_DB_ALIAS, *, wait: bool = False) -> int:
    """Turn the deferred statements visible on ``using`` into messages; returns how many.

    Committed statements, and inside a transaction also its own. Statements are expanded in
    the order they ran, in one transaction. When another process is expanding, returns 0 at
    once, or with ``wait`` waits for it (erasure must see every message of a user).
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return 0
    if not DeferredStatement.objects.using(using).exists():
        return 0
    lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    with transaction.atomic(using=using):
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {lock}(%s)", [LOCK_KEY])
            locked = cursor.fetchone()[0]
        if not wait and not locked:
            return 0
        count = expand_pending(connection)
    if count:
        logger.debug("django-cdp: expanded %d deferred statements on %s", count, using)
    return count
