"""What the triggers must know of the application, sent with the write itself.

Two transaction-local settings, put into the SQL of each write while they
matter: ``SELECT set_config('django_cdp.off', …, true), set_config(
'django_cdp.context', …, true); <the write>``, one round trip, in the same
transaction as the write (in autocommit the statements of one query are one
implicit transaction). django-pghistory sends its context like this; pgtrigger
its ``ignore()``.

* ``django_cdp.off``: ``tracking_disabled()`` (and ``ENABLED = False``) must
  silence the triggers too; they return at once when it is ``on``.
* ``django_cdp.context``: the JSON of the current :func:`django_cdp.context`
  (and the request's ``anonymousId``), which the triggers add to the messages
  they write (:mod:`django_cdp.scope`).

Each write carries the values of the moment, so a context that changes between
two statements of one transaction is right for each; the first write after both
are gone again in the same transaction resets them. Being transaction-local,
nothing outlives the transaction: a pooled connection's next request starts
without them.

Only writes (``INSERT``, ``UPDATE``, ``DELETE``, ``MERGE``) carry them, and only
while it matters: a connection that never had either set runs its SQL as it
is. The wrapper is installed on every PostgreSQL connection when it is created.
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created
from django.dispatch import receiver

from django_cdp.capture.sql import CONTEXT_SETTING, OFF_SETTING
from django_cdp.scope import current_sql, tracking_active

_WRITES = ("insert", "update", "delete", "merge", "with")
#: The transaction (outermost atomic block) in which this connection set either setting.
_FLAG = "_django_cdp_off"
_CONTEXT = "_django_cdp_context"
#: Set on a connection while a fixture is saved.
_RAW = "_django_cdp_raw_save"
_SET = f"SELECT set_config('{OFF_SETTING}', %s, true), set_config('{CONTEXT_SETTING}', %s, true); "


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
        ambient = current_sql()
        if (
            not isinstance(sql, str)
            or not _is_write(sql)
            or (not off and not ambient and not _flagged(connection))
        ):
            return execute(sql, params, many, context)
        values = ["on" if off else "", ambient]
        if many:
            # executemany() cannot carry a second statement: set them on their own first.
            with connection.cursor() as cursor:
                cursor.execute(_SET.rstrip("; "), values)
            result = execute(sql, params, many, context)
        else:
            if params is None:  # with parameters, a literal % must be doubled
                sql, params = sql.replace("%", "%%"), ()
            if isinstance(params, dict):
                prefixed = (
                    _SET.replace("%s", f"%({_FLAG})s", 1).replace("%s", f"%({_CONTEXT})s", 1) + sql
                )
                named = {**params, _FLAG: values[0], _CONTEXT: values[1]}
                result = execute(prefixed, named, many, context)
            else:
                result = execute(_SET + sql, [*values, *params], many, context)
            from django.db.backends.postgresql.psycopg_any import is_psycopg3

            if is_psycopg3:  # psycopg 2 returns the last statement's results already
                context["cursor"].nextset()  # the caller reads the write's results, not ours
        # Remember the transaction whose settings are now set (an autocommit statement's
        # settings end with it).
        transaction = _transaction(connection)
        connection.__dict__[_FLAG] = transaction if (off or ambient) else None
        return result


def _transaction(connection: Any) -> Any:
    """The outermost atomic block: it stands for the open transaction (None: autocommit)."""
    blocks = connection.atomic_blocks
    return blocks[0] if blocks else None


def _flagged(connection: Any) -> bool:
    """Whether the open transaction has a setting set by an earlier write."""
    flagged = connection.__dict__.get(_FLAG)
    return flagged is not None and flagged is _transaction(connection)


@receiver(connection_created)
def _install(sender, connection, **kwargs) -> None:
    if connection.vendor == "postgresql" and not any(
        isinstance(w, _Wrapper) for w in connection.execute_wrappers
    ):
        connection.execute_wrappers.append(_Wrapper(connection))
