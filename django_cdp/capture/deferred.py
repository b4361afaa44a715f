"""Deferred statements: statements the capture triggers stored whole, turned into messages.

A statement that changes at least ``DEFER_STATEMENT_ROWS`` rows (by default 1: every
statement) of a model whose messages say only what is on the row
(:func:`django_cdp.capture.triggers.deferrable`) costs its transaction one
:class:`~django_cdp.models.DeferredStatement` row instead of a message per row, with their
index entries and JSON. The messages are written later by the generated
functions, from the stored rows, exactly as the trigger would have written them:

* by a later statement of the same transaction that is not deferred, before its own
  messages (so the rules of one transaction hold across both), or by :func:`expand_own`;
* by delivery (:func:`expand`), before it claims the next batch, for committed ones (their
  owners' re-identify included);
* by ``cdp_triggers install`` / ``uninstall``, before the functions change or go.
"""

from __future__ import annotations

import logging

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Max

from django_cdp.capture.triggers import EXPANDER_EXISTS, expand_pending
from django_cdp.models import DeferredStatement

logger = logging.getLogger("django_cdp")

#: The advisory lock one expanding process holds (``'cdpx'`` in ASCII): two workers never
#: expand the same statements, and the second goes on claiming at once.
LOCK_KEY = 0x63647078
#: Rows expanded per transaction (whole transactions' statements at a time, at least one):
#: a backlog becomes messages in transactions of bounded size, each committed on its own.
ROWS_PER_TRANSACTION = 20_000
#: Statements looked at per transaction of expansion (their transactions are taken whole).
HEAD = 1000


def expand(
    using: str = DEFAULT_DB_ALIAS, *, wait: bool = False, max_rows: int | None = None
) -> int:
    """Turn the deferred statements visible on ``using`` into messages; returns how many.

    Committed statements, and inside a transaction also its own, in the order they ran:
    the statements of one transaction together, in transactions of about
    :data:`ROWS_PER_TRANSACTION` rows, until none is left or ``max_rows`` rows were
    expanded (delivery bounds it, so that a backlog does not hold up sending; the rest
    waits for its next run). When another process is expanding, returns 0 at once, or with
    ``wait`` waits for it (erasure must see every message of a user).
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return 0
    # What is stored meanwhile waits for the next call: a call ends, however busy the writers.
    last = DeferredStatement.objects.using(using).aggregate(last=Max("id"))["last"]
    if last is None:
        return 0
    lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    expanded = rows = 0
    while max_rows is None or rows < max_rows:
        with transaction.atomic(using=using):
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT {lock}(%s)", [LOCK_KEY])
                if not wait and not cursor.fetchone()[0]:
                    break
            batch = _next_transactions(using, last)
            count = expand_pending(connection, [xid for xid, _ in batch]) if batch else 0
        if not count:
            break
        expanded += count
        rows += sum(n for _, n in batch)
    if expanded:
        logger.debug("django-cdp: expanded %d deferred statements on %s", expanded, using)
    return expanded


def expand_own(using: str = DEFAULT_DB_ALIAS) -> int:
    """Turn the statements the current transaction deferred into messages now; returns how
    many.

    For code that reads back the messages its own transaction wrote (a view that shows them,
    a test inside ``TestCase``'s transaction): only this transaction's statements, without
    the lock delivery takes and without the backlog. Outside a transaction the statements
    are committed already: :func:`expand` expands them.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or not connection.in_atomic_block:
        return 0
    with connection.cursor() as cursor:
        # No transaction id yet: nothing written, so nothing deferred.
        cursor.execute("SELECT pg_current_xact_id_if_assigned()::text::bigint")
        xid = cursor.fetchone()[0]
    return expand_pending(connection, [xid]) if xid is not None else 0


def _next_transactions(using: str, last: int) -> list[tuple[int, int]]:
    """``(xid, rows)`` of the transactions whose statements are expanded next: the oldest
    first, about :data:`ROWS_PER_TRANSACTION` rows of them, at least one transaction, none
    of those stored after the statement ``last``.

    The transactions are those of the oldest :data:`HEAD` statements (along the primary key),
    with all their statements (along the ``xid`` index): a backlog of a million single-row
    statements costs each call a thousand of them, not a pass over the million.
    """
    table = connections[using].ops.quote_name(DeferredStatement._meta.db_table)
    # A statement whose expander is gone (triggers uninstalled by hand) waits, and does not
    # hold up the others.
    installed = EXPANDER_EXISTS.format("d.expander")
    query = (
        f"WITH head AS (SELECT DISTINCT h.xid FROM (SELECT d.xid FROM {table} d "
        f"WHERE d.id <= %s AND {installed} ORDER BY d.id LIMIT {HEAD}) h) "
        f"SELECT d.xid, sum(d.row_count) FROM {table} d WHERE d.xid IN (SELECT xid FROM head) "
        f"AND d.id <= %s AND {installed} GROUP BY d.xid ORDER BY min(d.id)"
    )
    with connections[using].cursor() as cursor:
        cursor.execute(query, [last, last])
        queue = cursor.fetchall()
    batch: list[tuple[int, int]] = []
    total = 0
    for xid, rows in queue:
        if batch and total + rows > ROWS_PER_TRANSACTION:
            break
        batch.append((xid, rows))
        total += rows
    return batch
