"""What the triggers must know of the application, sent with the write itself.

``tracking_disabled()`` (and ``ENABLED = False``) must silence the triggers too.
They learn it from the transaction-local setting ``django_cdp.off``, which this
module puts into the SQL of each write while tracking is off:
``SELECT set_config('django_cdp.off', 'on', true); <the write>``, one round
trip, in the same transaction as the write (in autocommit the two statements of
one query are one implicit transaction). The first write after tracking is on
again in the same transaction resets it the same way. django-pghistory sends
its context like this; pgtrigger its ``ignore()``.

Only writes (``INSERT``, ``UPDATE``, ``DELETE``, ``MERGE``) carry it, and only
while it matters: a connection that never had tracking off runs its SQL as it
is. The wrapper is installed on every PostgreSQL connection when it is created.
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created
from django.dispatch import receiver

from django_cdp.capture.sql import OFF_SETTING
from django_cdp.context import tracking_active

_WRITES = ("insert", "update", "delete", "merge", "with")
#: The transaction (outermost atomic block) in which this connection set ``django_cdp.off``.
_FLAG = "_django_cdp_off"
#: Set on a connection while a fixture is saved.
_RAW = "_django_cdp_raw_save"
_SET = f"SELECT set_config('{OFF_SETTING}', %s, true); "


def raw_save(using: str, active: bool) -> None:
    """Mark the writes of a fixture's ``save(raw=True)`` (``loaddata``): not changes, so the
    triggers stay silent for them, as the signal engine ignores raw saves."""
    connections[using].__dict__[_RAW] = active


def _is_write(sql: str) -> bool:
    return sql.lstrip()[:6].lower().startswith(_WRITES)


class _Wrapper:
    """The execute wrapper of one connection."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def __call__(self, execute, sql, params, many, context):
        connection = self.connection
        off = not tracking_active() or connection.__dict__.get(_RAW, False)
        if not isinstance(sql, str) or not _is_write(sql) or (not off and not _flagged(connection)):
            return execute(sql, params, many, context)
        value = "on" if off else ""
        if many:
            # executemany() cannot carry a second statement: set it on its own first.
            with connection.cursor() as cursor:
                cursor.execute(_SET.rstrip("; "), [value])
            result = execute(sql, params, many, context)
        else:
            if params is None:  # with parameters, a literal % must be doubled
                sql, params = sql.replace("%", "%%"), ()
            if isinstance(params, dict):
                prefixed = _SET.replace("%s", f"%({_FLAG})s") + sql
                result = execute(prefixed, {**params, _FLAG: value}, many, context)
            else:
                result = execute(_SET + sql, [value, *params], many, context)
            from django.db.backends.postgresql.psycopg_any import is_psycopg3

            if is_psycopg3:  # psycopg 2 returns the last statement's results already
                context["cursor"].nextset()  # the caller reads the write's results, not ours
        # Remember the transaction whose setting is now "on" (an autocommit statement's
        # setting ends with it).
        transaction = _transaction(connection)
        connection.__dict__[_FLAG] = transaction if off and transaction is not None else None
        return result


def _transaction(connection: Any) -> Any:
    """The outermost atomic block: it stands for the open transaction (None: autocommit)."""
    blocks = connection.atomic_blocks
    return blocks[0] if blocks else None


def _flagged(connection: Any) -> bool:
    """Whether the open transaction has ``django_cdp.off`` set by an earlier write."""
    flagged = connection.__dict__.get(_FLAG)
    return flagged is not None and flagged is _transaction(connection)


@receiver(connection_created)
def _install(sender, connection, **kwargs) -> None:
    if connection.vendor == "postgresql" and not any(
        isinstance(w, _Wrapper) for w in connection.execute_wrappers
    ):
        connection.execute_wrappers.append(_Wrapper(connection))
