"""SQL that computes messages in PostgreSQL, exactly as the signal engine builds them in Python.

The trigger engine (:mod:`django_cdp.capture.triggers`) writes its functions from
these pieces, and the signal engine reads an owner's traits and their digest
through :func:`traits_query` on PostgreSQL, so that both engines compute traits
(and the digest that says whether they changed) with the same SQL.

How a row is read: always through ``to_jsonb(row)`` and its keys, never as
``NEW.column``. A column that a migration renamed or dropped then reads as
NULL until the triggers are installed again, instead of failing the user's
write (PL/pgSQL does not track which columns a function body uses). No value of
the user's data is ever cast: numbers, strings, booleans, UUIDs, dates and
JSON are taken from the jsonb as they are; times are rewritten as text; the
only casts are of a foreign key's own text back to its column type, to look up
the row it points to.

Every value's JSON form matches :func:`django_cdp.payloads.field_value`:

* a ``numeric`` keeps its column's scale in jsonb (``49.90``), like a quantized
  ``Decimal``;
* a ``timestamptz`` is rendered in UTC with a ``Z`` and microseconds only when
  there are some, as ``datetime.isoformat()`` does (the functions run with
  ``TimeZone = 'UTC'``, so jsonb renders ``+00:00``, which is rewritten);
* a non-finite float (jsonb gives ``"NaN"``, ``"Infinity"``) is not sent: the
  row fails with the signal engine's reason (``score: inf is not a JSON number``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper

from django_cdp import __version__
from django_cdp.capture.engines import value_field
from django_cdp.fields import column, foreign_key
from django_cdp.payloads import LIBRARY_NAME
from django_cdp.registry import IdentityConfig, ModelConfig, Source

#: Dollar-quote tag of every generated function body.
BODY_TAG = "$django_cdp$"

#: Settings a generated function runs with: UTC rendering of times, and one generic plan
#: per statement, planned once per connection (a custom plan per call would re-plan these
#: large statements on every write). The search_path is added per database
#: (:func:`function_options`).
FUNCTION_OPTIONS = "SET TimeZone = 'UTC' SET plan_cache_mode = force_generic_plan"


def function_options(connection: BaseDatabaseWrapper) -> str:
    """:data:`FUNCTION_OPTIONS` with the connection's schemas as a fixed search_path.

    The functions run as their owner (``SECURITY DEFINER``), so they must not look up
    names where the writing role could put its own (``pg_temp`` last, as PostgreSQL's docs
    advise); and they must find the tables where the application's connection finds them,
    which may be a schema other than ``public``.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schemas(false)")
        schemas = cursor.fetchone()[0]
    path = ", ".join(connection.ops.quote_name(s) for s in [*schemas, "pg_temp"])
    return f"{FUNCTION_OPTIONS} SET search_path = {path}"


#: The transaction-local setting ``tracking_disabled()`` sets for the triggers.
OFF_SETTING = "django_cdp.off"
#: Transaction-local flags the trigger functions set once they have written rows with this
#: transaction's id: track rows (``TRACKED``) and identify rows (``IDENTIFIED``). Until a flag
#: is set, a later statement of the transaction has no row of that kind to combine with, so
#: it takes the short path: a plain insert, and the identify's read-only digest check. A
#: rolled-back savepoint resets them with the rows they describe.
TRACKED_SETTING = "django_cdp.tracked"
IDENTIFIED_SETTING = "django_cdp.identified"
#: Set while this transaction has statements stored in ``DeferredStatement`` that are not
#: messages yet: every other tracked statement turns them into messages first.
DEFERRED_SETTING = "django_cdp.deferred"
#: The transaction-local setting that carries ``django_cdp.context()`` to the triggers:
#: ``{"context": {...}, "anonymousId": ...}`` (:mod:`django_cdp.scope`).
CONTEXT_SETTING = "django_cdp.context"
#: Its value, read once per statement into the variable (or column) ``ambient``.
AMBIENT = f"NULLIF(current_setting('{CONTEXT_SETTING}', true), '')::jsonb"


#: Ends a subquery that computes a value its outer query reads several times (a row's jsonb,
#: a message's text). Without it PostgreSQL pulls the subquery up into the outer query and
#: evaluates the expression once per reference: ``to_jsonb(row)`` a dozen times per row,
#: which made these expressions most of a trigger's cost.
FENCE = "OFFSET 0"


def jsonb_rows(rows: str, alias: str = "t", name: str = "j", where: str = "") -> str:
    """``(SELECT to_jsonb(alias) AS name FROM rows alias [WHERE …])``: each row of ``rows`` as
    jsonb, computed once (:data:`FENCE`)."""
    condition = f" WHERE {where}" if where else ""
    return f"(SELECT to_jsonb({alias}) AS {name} FROM {rows} {alias}{condition} {FENCE})"


def literal(value: str) -> str:
    """A SQL string literal for ``value`` (generated function bodies cannot take parameters)."""
    if BODY_TAG in value:
        raise ValueError(f"{value!r} cannot be written into a trigger function")
    return "'" + value.replace("'", "''") + "'"


def jsonb_literal(value: object) -> str:
    return literal(json.dumps(value, separators=(",", ":"), ensure_ascii=False)) + "::jsonb"


@dataclass(frozen=True)
class Value:
    """A value's SQL: its jsonb expression, and a text expression that is non-NULL (the
    reason) when the value cannot be sent."""

    sql: str
    error: str | None = None


class Builder:
    """SQL expressions over one database connection (for quoting and column types)."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.quote = connection.ops.quote_name

    def table(self, model: type[models.Model]) -> str:
        return self.quote(model._meta.db_table)

    # --- values -------------------------------------------------------------------------------

    def column_value(self, field: models.Field, row: str, name: str) -> Value:
        """The JSON of ``field``'s column in the jsonb ``row``, named ``name`` in errors."""
        raw = f"({row}->{literal(column(field))})"
        kind = value_field(field).get_internal_type()
        if kind == "DateTimeField":
            # jsonb renders a timestamptz as "…T10:34:56.5+00:00" (the functions run in UTC);
            # isoformat() writes "…T10:34:56.500000", and no fraction for whole seconds.
            text = f"({raw}#>>'{{}}')"
            iso = (
                f"substr({text}, 1, 19) || COALESCE('.' || "
                f"rpad(substring({text} from '^.{{19}}\\.(\\d+)'), 6, '0'), '') || 'Z'"
            )
            return Value(f"to_jsonb({iso})")
        if kind == "FloatField":
            bad = f"jsonb_typeof({raw}) = 'string'"
            shown = (
                f"CASE {raw}#>>'{{}}' WHEN 'NaN' THEN 'nan' WHEN 'Infinity' THEN 'inf' "
                "ELSE '-inf' END"
            )
            return Value(
                f"CASE WHEN {bad} THEN NULL ELSE {raw} END",
                f"CASE WHEN {bad} THEN {literal(name + ': ')} || {shown} "
                "|| ' is not a JSON number' END",
            )
        return Value(raw)

    def pk_lookup(self, fk: models.ForeignKey, row: str, alias: str) -> str:
        """``alias.<target pk> = <fk text>::type``: finds the row ``fk`` points to from ``row``."""
        target = fk.target_field
        return (
            f"{alias}.{self.quote(column(target))} = "
            f"({row}->>{literal(fk.column)})::{target.cast_db_type(self.connection)}"
        )

    def follow(self, model: type[models.Model], path: list[str], row: str) -> tuple[str, str, str]:
        """FROM/WHERE of the rows a foreign-key ``path`` reaches from ``row`` (a jsonb of a
        ``model`` row), and the jsonb expression of the last one: (from, where, last)."""
        joins, where = [], ""
        current, current_row = model, row
        for depth, part in enumerate(path, 1):
            fk = foreign_key(current, part)
            alias = f"hop{depth}"
            target = fk.related_model
            lookup = self.pk_lookup(fk, current_row, alias)
            if depth == 1:
                joins.append(f"{self.table(target)} {alias}")
                where = lookup
            else:
                joins.append(f"JOIN {self.table(target)} {alias} ON {lookup}")
            current, current_row = target, f"to_jsonb({alias})"
        return " ".join(joins), where, current_row

    def source_value(self, model: type[models.Model], source: Source, row: str) -> Value:
        """A property's or trait's value, read from ``row`` (a jsonb of a ``model`` row)."""
        if source.kind == "column":
            return self.column_value(source.model_field, row, source.name)
        parts = source.path.split("__")
        joins, where, last = self.follow(model, parts[:-1], row)
        value = self.column_value(source.model_field, last, source.name)
        select = f"(SELECT {value.sql} FROM {joins} WHERE {where})"
        error = f"(SELECT {value.error} FROM {joins} WHERE {where})" if value.error else None
        return Value(select, error)

    def pk_text(self, model: type[models.Model], row: str) -> str:
        return f"({row}->>{literal(column(model._meta.pk))})"

    def pk_repr(self, model: type[models.Model], row: str) -> str:
        """``repr(pk)`` as Python writes it in a failed row's reason: ``3``, ``'a'``,
        ``UUID('…')``."""
        text = self.pk_text(model, row)
        kind = value_field(model._meta.pk).get_internal_type()
        if kind == "UUIDField":
            return f"('UUID(''' || {text} || ''')')"
        if kind in ("CharField", "TextField", "SlugField", "EmailField", "URLField"):
            return f"('''' || {text} || '''')"
        return text

    def describe(self, model: type[models.Model], row: str) -> str:
        return f"({literal(model._meta.label + ' pk=')} || {self.pk_repr(model, row)})"

    # --- owners -------------------------------------------------------------------------------

    def owner(self, config: ModelConfig, identity: IdentityConfig, row: str) -> tuple[str, str]:
        """(owner pk text, userId text) of a ``config.model`` row; NULL when it has none."""
        user_id = identity.user_id_field
        if config.is_identity:
            return self.identity_owner(identity, row)
        assert config.owner_path is not None  # every model but the identity model has one
        parts = config.owner_path.split("__")
        if len(parts) == 1 and user_id.primary_key:
            fk = foreign_key(config.model, parts[0])
            text = f"({row}->>{literal(fk.column)})"
            return text, self._user_id(text)
        joins, where, last = self.follow(config.model, parts, row)
        pk_column = literal(column(identity.model._meta.pk))
        pk = f"(SELECT {last}->>{pk_column} FROM {joins} WHERE {where})"
        uid = f"(SELECT {last}->>{literal(column(user_id))} FROM {joins} WHERE {where})"
        return pk, self._user_id(uid)

    def identity_owner(self, identity: IdentityConfig, row: str) -> tuple[str, str]:
        """(pk text, userId text) of an identity row."""
        uid = f"{row}->>{literal(column(identity.user_id_field))}"
        return self.pk_text(identity.model, row), self._user_id(uid)

    @staticmethod
    def _user_id(text: str) -> str:
        return f"NULLIF({text}, '')"

    # --- objects ------------------------------------------------------------------------------

    def object(self, values: Iterable[tuple[str, Value]]) -> tuple[str, str]:
        """``jsonb_build_object`` of named values, and the first error among them (or NULL)."""
        pairs, errors = [], []
        for name, value in values:
            pairs.append(f"{literal(name)}, {value.sql}")
            if value.error:
                errors.append(value.error)
        obj = "jsonb_build_object(" + ", ".join(pairs) + ")" if pairs else "'{}'::jsonb"
        error = (
            "COALESCE(" + ", ".join(errors) + ")" if len(errors) > 1 else (errors or ["NULL"])[0]
        )
        return obj, f"({error})::text"

    def properties(self, config: ModelConfig, row: str) -> tuple[str, str]:
        """The properties of a track (``id`` first, then the mapping) and their first error."""
        values = [("id", Value(f"({row}->{literal(column(config.model._meta.pk))})"))]
        values += [(s.name, self.source_value(config.model, s, row)) for s in config.properties]
        return self.object(values)

    def tracked(self, config: ModelConfig, row: str) -> str:
        """The tracked columns (what decides an ``Updated``), as a jsonb object by attname."""
        pairs = [
            f"{literal(attname)}, ({row}->{literal(column(field))})"
            for attname, field in config.column_fields.items()
        ]
        return "jsonb_build_object(" + ", ".join(pairs) + ")" if pairs else "'{}'::jsonb"

    def changed_fields(self, config: ModelConfig, ref: str, cur: str, *, rows: bool = False) -> str:
        """The property names whose columns differ between two :meth:`tracked` objects, or
        (``rows=True``) between two rows' jsonb, keyed by column."""
        cases = []
        for attname, names in config.tracked_columns.items():
            key = literal(column(config.column_fields[attname]) if rows else attname)
            for name in names:
                cases.append(
                    f"CASE WHEN ({ref}->{key}) IS DISTINCT FROM ({cur}->{key}) "
                    f"THEN {literal(name)} END"
                )
        if not cases:
            return "ARRAY[]::text[]"
        return "array_remove(ARRAY[" + ", ".join(cases) + "]::text[], NULL)"

    def traits(self, identity: IdentityConfig, row: str) -> tuple[str, str]:
        return self.object(
            (s.name, self.source_value(identity.model, s, row)) for s in identity.traits
        )


# --- messages -----------------------------------------------------------------------------------

LIBRARY = {"library": {"name": LIBRARY_NAME, "version": __version__}}
#: ``originalTimestamp`` of a statement's messages: taken once per statement into the function's
#: variable ``stamp`` (the wall clock, as the signal engine's ``timezone.now()`` at the write),
#: written as ``isoformat()`` writes it: microseconds, none for a whole second.
TIMESTAMP = (
    "replace(to_char(clock_timestamp() AT TIME ZONE 'UTC', "
    "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '.000000Z', 'Z')"
)


#: The ``context`` of a message: ``ambient``'s fields, then django-cdp's ``library``.
CONTEXT = f"(COALESCE(ambient->'context', '{{}}'::jsonb) || {jsonb_literal(LIBRARY)})"
#: What ``ambient`` adds at the top level of a message (the browser's ``anonymousId``).
TOP_LEVEL = "COALESCE(ambient - 'context', '{}'::jsonb)"

#: The first 15 characters of the statement's message ids (``'tttttttt-tttt-7'``: the time in
#: milliseconds, then the version), taken once per statement into the variable ``idp``.
#: A plain expression (no subquery), which PL/pgSQL evaluates without running a query.
MESSAGE_ID_PREFIX = (
    "(overlay(lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') "
    "placing '-' from 9 for 0) || '-7')"
)
#: A new message id: a time-ordered UUID (version 7) as
#: :func:`django_cdp.payloads.new_message_id` makes them, the rest of it random.
NEW_MESSAGE_ID = "(idp || substr(gen_random_uuid()::text, 16))"


def track_message(event: str, user_id: str, properties: str, integrations: dict | None) -> str:
    """The jsonb of a track, as :func:`django_cdp.payloads.track_message` builds it."""
    return (
        "(jsonb_build_object('type', 'track', 'userId', {uid}, 'messageId', mid, "
        "'originalTimestamp', stamp, 'channel', 'server', 'context', {ctx}, 'event', {event}, "
        "'properties', {props}, 'integrations', {integrations}) || {top})"
    ).format(
        top=TOP_LEVEL,
        uid=user_id,
        ctx=CONTEXT,
        event=literal(event),
        props=properties,
        integrations=jsonb_literal(integrations or {"All": True}),
    )


def identify_message(user_id: str, traits: str) -> str:
    """The jsonb of an identify, as :func:`django_cdp.payloads.identify_message` builds it."""
    return (
        f"(jsonb_build_object('type', 'identify', 'userId', {user_id}, 'messageId', mid, "
        "'originalTimestamp', stamp, 'channel', 'server', "
        f"'context', {CONTEXT} || jsonb_build_object('traits', {traits}), "
        f"'traits', {traits}, "
        f"'integrations', '{{\"All\":true}}'::jsonb) || {TOP_LEVEL})"
    )


def minimal_message(text: str, kind: str) -> str:
    """The text of the minimal message of a row that fails (:func:`outcome`): the message
    ``text`` with its properties (a track) or traits (an identify) emptied.

    Taken from the built text rather than built again: PostgreSQL prepares every branch of
    an expression each time a statement runs, and a second message build in the failure
    branch made every write pay for it.
    """
    paths = ["{properties}"] if kind == "track" else ["{traits}", "{context,traits}"]
    expr = f"({text})::jsonb"
    for path in paths:
        expr = f"jsonb_set({expr}, '{path}', '{{}}'::jsonb)"
    return f"({expr})::text"


def _thousands(expr: str) -> str:
    return f"to_char({expr}, 'FM999,999,999,999,990')"


def outcome(
    text: str, size: str, minimal: str, error: str, user_id: str, where: str, limit: int
) -> dict:
    """Status, reason and payload of a built row, in the order
    :func:`~django_cdp.capture.rows.build_row` decides them: cannot be built, no userId,
    too large. ``text`` and ``size`` are the message's text and its length in bytes, computed
    once; ``minimal`` is only built for a row that fails."""
    too_large = f"{size} > {limit}"
    return {
        "status": (
            f"CASE WHEN {error} IS NOT NULL OR {user_id} IS NULL OR {too_large} "
            "THEN 'failed' ELSE 'pending' END"
        ),
        "last_error": (
            f"CASE WHEN {error} IS NOT NULL THEN {where} || ': ' || {error} "
            f"WHEN {user_id} IS NULL THEN 'no userId' "
            f"WHEN {too_large} THEN {where} || ': too large (' || {_thousands(size)} || ' > ' "
            f"|| {literal(f'{limit:,}')} || ' bytes); it begins: ' || left({text}, 500) "
            "ELSE '' END"
        ),
        "payload": (
            f"CASE WHEN {error} IS NOT NULL OR ({user_id} IS NOT NULL AND {too_large}) "
            f"THEN ({minimal})::text ELSE {text} END"
        ),
    }


def traits_query(builder: Builder, identity: IdentityConfig, digests_table: str) -> str:
    """SELECT of owners' userId, traits (jsonb text), error and digest, with the digest last
    recorded for them: one row per pk in ``%s`` (an array of pk texts)."""
    pk = identity.model._meta.pk
    traits, error = builder.traits(identity, "r.s")
    _, uid = builder.identity_owner(identity, "r.s")
    rows = (
        f"SELECT {builder.pk_text(identity.model, 'r.s')} AS pk, {uid} AS uid, "
        f"({traits})::text AS traits, {error} AS error "
        "FROM "
        + jsonb_rows(
            builder.table(identity.model),
            name="s",
            where=f"t.{builder.quote(column(pk))} = "
            f"ANY(%s::{pk.cast_db_type(builder.connection)}[])",
        )
        + " r"
    )
    return (
        "SELECT q.pk, q.uid, q.traits, q.error, md5(q.traits) AS digest, "
        f"(SELECT d.digest FROM {digests_table} d WHERE d.user_id = q.uid) AS stored "
        f"FROM ({rows} {FENCE}) q"
    )
