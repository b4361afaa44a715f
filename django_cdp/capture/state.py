"""The signal engine's per-transaction state, and the statements it writes with.

The one place that knows what this process wrote in the open transaction of a
connection: one entry per changed object and per identified owner, so that
several changes coalesce into one message, and savepoint markers, so that a
rolled-back savepoint takes its entries with it (each savepoint level in which
the writer wrote registers a no-op ``on_commit`` marker; Django discards the
markers of a savepoint that rolls back, and an entry whose marker is gone is
forgotten).

The statements here are the only SQL the signal engine runs in the user's
transaction: complete INSERTs of outbox rows, and the UPDATE or DELETE of a
row the same transaction wrote.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, transaction

from django_cdp import statements
from django_cdp.models import Message
from django_cdp.signals import message_created

logger = logging.getLogger("django_cdp")

_STATE = "_django_cdp_transaction"


@dataclass
class Entry:
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


class Transaction:
    """What this process wrote in the current transaction of one connection."""

    def __init__(self, using: str) -> None:
        self.using = using
        self.connection = connections[using]
        self.changes: dict[tuple[str, Any], Entry] = {}
        self.identifies: dict[Any, Entry] = {}
        self.deleting: dict[Any, Callable[[], None]] = {}
        self.wrote = False
        self._markers: dict[tuple[str, ...], Callable[[], None]] = {}

        def django_cdp_after_commit() -> None:
            if self.connection.__dict__.get(_STATE) is self:
                del self.connection.__dict__[_STATE]
            if self.wrote:
                kick(self.using)

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
        # (savepoint ids, func, robust) since Django 4.2; django-stubs still says 2-tuples.
        run_on_commit: list[tuple[Any, ...]] = self.connection.run_on_commit
        return any(entry[1] is marker for entry in run_on_commit)

    def live(self, entries: dict, key: Any) -> Entry | None:
        """The entry for ``key`` unless its savepoint was rolled back (then it is dropped)."""
        entry = entries.get(key)
        if entry is not None and not self.alive(entry.marker):
            del entries[key]
            return None
        return entry


def in_transaction(using: str) -> bool:
    return connections[using].in_atomic_block


def current(using: str, *, create: bool = True) -> Transaction | None:
    """The state of the open transaction on ``using`` (``create`` inside an atomic block)."""
    connection = connections[using]
    state = connection.__dict__.get(_STATE)
    if state is not None and state.alive(state.root):
        return state
    if not create or not connection.in_atomic_block:
        return None
    state = Transaction(using)
    connection.__dict__[_STATE] = state
    return state


def live_entry(using: str, entries: str, key: Any) -> Entry | None:
    """The live entry for ``key`` in the open transaction, read without creating state."""
    tx = current(using, create=False)
    return tx.live(getattr(tx, entries), key) if tx is not None else None


@contextlib.contextmanager
def writing(using: str) -> Iterator[Transaction]:
    """The write phase: only complete statements on outbox rows run inside.

    Inside the user's transaction no block of ours is opened (nothing here can
    mark theirs for rollback); in autocommit the statements share one short
    transaction of ours.
    """
    if connections[using].in_atomic_block:
        yield _open(using)
    else:
        with transaction.atomic(using=using, savepoint=False):
            yield _open(using)


def _open(using: str) -> Transaction:
    """The state of the atomic block open on ``using`` (created on first use)."""
    tx = current(using)
    assert tx is not None  # current() creates it inside an atomic block
    return tx


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


def insert(row: Message, using: str) -> None:
    statements.insert_message(row, using)
    if message_created.has_listeners(Message):
        # A receiver is the project's code: its failure must not reach the user's write.
        for receiver, result in message_created.send_robust(sender=Message, message=row):
            if isinstance(result, Exception):
                logger.error(
                    "django-cdp: a message_created receiver %r raised %r", receiver, result
                )


def store(tx: Transaction, row: Message) -> None:
    """Insert a row in the open transaction, which then asks for delivery after commit."""
    insert(row, tx.using)
    tx.wrote = True


def rewrite(tx: Transaction, entry: Entry, row: Message) -> None:
    """Replace a row written earlier in this transaction (same messageId) with ``row``.

    The row is not committed yet, so no worker can have touched it: its status
    is exactly what the final message makes it (a too-large message that shrank
    is pending again).
    """
    assert entry.row_id is not None  # only a row stored in this transaction is rewritten
    Message.objects.using(tx.using).filter(pk=entry.row_id).update(
        payload=row.payload,
        event=row.event,
        user_id=row.user_id,
        status=row.status,
        last_error=row.last_error,
        violations=row.violations,
    )


def discard(tx: Transaction, entry: Entry) -> None:
    if entry.row_id is not None:
        Message.objects.using(tx.using).filter(pk=entry.row_id).delete()


def kick(using: str) -> None:
    """Ask for delivery of what was just committed (never raises)."""
    from django_cdp.kick import request_delivery

    request_delivery(using)
