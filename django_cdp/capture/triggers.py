"""The trigger engine: PostgreSQL triggers, generated from ``DJANGO_CDP``, write the outbox rows.

For every model captured by triggers (:mod:`django_cdp.capture.engines`) three
``AFTER … FOR EACH STATEMENT`` triggers with transition tables (one per
operation, as PostgreSQL requires) call functions generated here. Each
statement is handled as a set: a ``QuerySet.update()`` of 10,000 rows is one
``INSERT … SELECT`` of 10,000 messages, not 10,000 function calls. They write
the rows the signal engine writes for the same change (same events, properties,
``changed_fields``, owner, traits, reasons), in the same statement as the change:

* **One event per object per transaction.** Rows a transaction writes carry its
  id (``xid``) and what the triggers must remember (``capture``: the action, an
  update's reference values, an identify's digest) until delivery claims them.
  A later statement of the same transaction finds them through the outbox's
  ``(source_model, source_pk, xid)`` index and rewrites or deletes them: create
  then update is one ``Created`` with the final values; update then delete only
  ``Deleted``; create then delete nothing; changes that cancel out nothing. A
  rolled-back savepoint takes its rows with it, so nothing else needs to be
  remembered.
* **Identifies** are computed by one generated function per identity model:
  traits read in the database, their digest compared with ``TraitsDigest``, at
  most one identify row per owner and transaction, rewritten with the final
  traits.
* **No exception blocks** (each would open a subtransaction per call), no cast
  of the user's data, columns read through ``to_jsonb(row)`` (see
  :mod:`django_cdp.capture.sql`): nothing in a trigger fails on the user's data.
* ``tracking_disabled()`` sets the transaction-local ``django_cdp.off`` in the
  same statement as the write (:mod:`django_cdp.capture.context`); the triggers
  then return at once.

Installation is tracked as pgtrigger tracks it: every trigger carries the hash
of the SQL it was generated from in its comment, so ``cdp_triggers`` can tell
installed, missing and outdated triggers apart without a table of its own.
``migrate`` installs and updates them after the apps' migrations, in one
transaction; ``CREATE OR REPLACE`` changes a function without locking the table.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import NOT_PROVIDED
from django.dispatch import receiver

from django_cdp import consent
from django_cdp.capture import engines
from django_cdp.capture.sql import (
    AMBIENT,
    BODY_TAG,
    DEFERRED_SETTING,
    FENCE,
    IDENTIFIED_SETTING,
    MESSAGE_ID_PREFIX,
    NEW_MESSAGE_ID,
    OFF_SETTING,
    TIMESTAMP,
    TRACKED_SETTING,
    Builder,
    function_options,
    identify_message,
    jsonb_rows,
    literal,
    minimal_message,
    outcome,
    track_message,
)
from django_cdp.fields import column
from django_cdp.models import DeferredStatement, Message, TraitsDigest, WithheldCount
from django_cdp.registry import CREATED, DELETED, UPDATED, IdentityConfig, ModelConfig, registry
from django_cdp.settings import SETTING_NAME, cdp_settings

logger = logging.getLogger("django_cdp")

PREFIX = "django_cdp_"
OPERATIONS = ("insert", "update", "delete")
#: What the trigger of each operation may see of the rows.
REFERENCING = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
}
#: The event each operation's messages carry (a statement is only deferred when it has one).
EVENTS = {"insert": CREATED, "update": UPDATED, "delete": DELETED}
#: How the generated SQL is laid out: change it and every installed trigger is outdated.
SQL_VERSION = "6"
#: The function that turns a transaction's deferred statements into messages.
EXPAND_FUNCTION = PREFIX + "expand"
#: SQL: the expander named by the text ``{}`` is installed (by signature: a trigger function
#: may bear the same name; quoted: a table's name may have capitals).
EXPANDER_EXISTS = "to_regprocedure(quote_ident({}) || '(bigint)') IS NOT NULL"
#: A deferred statement is stored in parts of at most this many rows, and about this many
#: bytes (PostgreSQL refuses a jsonb value of 256 MB or more).
STORE_ROWS = 10_000
STORE_BYTES = 64 * 1024 * 1024


# --- names ----------------------------------------------------------------------------------------


def _name(*parts: str) -> str:
    """A PostgreSQL identifier of at most 63 bytes (long table names get a hash suffix)."""
    name = PREFIX + "_".join(parts)
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return name.encode()[:54].decode(errors="ignore") + "_" + digest


def trigger_name(operation: str) -> str:
    return PREFIX + operation


def function_name(config: ModelConfig, operation: str) -> str:
    return _name(config.model._meta.db_table, operation)


def identify_function(identity: IdentityConfig) -> str:
    # "identify_owners": the function of SQL_VERSION 5 and before ("identify") took the owners
    # alone; a new name, so that no overload of the old one is left to call.
    return _name("identify_owners", identity.model._meta.db_table)


def expander_name(config: ModelConfig, operation: str) -> str:
    return _name(config.model._meta.db_table, "expand", operation)


def deferred_operations(config: ModelConfig) -> list[str]:
    """The operations whose statements are deferred (those with an event to write)."""
    if not deferrable(config):
        return []
    return [op for op in OPERATIONS if EVENTS[op] in config.events]


def deferrable(config: ModelConfig) -> bool:
    """Whether a statement of this model may be stored whole and expanded later.

    Only when everything its messages say is on the changed row itself: properties that
    are the model's own columns, and an owner that is a foreign key holding the owner's
    userId (its pk), and no ``CONSENT``. Then the messages built at delivery from the stored
    rows are the messages the statement would have written, whatever happens to other rows
    meanwhile.
    The identity model is never deferred: its statements also write identifies, and a
    deleted owner takes its identify of the transaction with it.
    """
    if config.is_identity or cdp_settings.DEFER_STATEMENT_ROWS is None:
        return False
    if consent.current() is not None:
        # Consent decides which rows write messages, and the normal path still takes back
        # the transaction's earlier messages of the others: not worth a second copy of that.
        return False
    if any(source.kind != "column" for source in config.properties):
        return False
    if config.owner_path is None or "__" in config.owner_path:
        return False
    return registry.configured_identity.user_id_field.primary_key


# --- generation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSql:
    """The generated SQL of one model: its functions, triggers and the hash of both."""

    config: ModelConfig
    functions: dict[str, str]  # operation -> CREATE OR REPLACE FUNCTION
    expanders: dict[str, str]  # operation -> the function expanding its deferred statements
    identify: str  # the identity function it calls ("" when it identifies nobody)
    expand: str  # the function expanding a transaction's deferred statements (shared)
    digest: str

    @property
    def table(self) -> str:
        return self.config.model._meta.db_table


class Generator:
    """Writes the trigger functions of the models captured on one database."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.sql = Builder(connection)
        self.q = connection.ops.quote_name
        self.message = self.q(Message._meta.db_table)
        self.deferred = self.q(DeferredStatement._meta.db_table)
        self.digests = self.q(TraitsDigest._meta.db_table)
        self.withheld = self.q(WithheldCount._meta.db_table)
        self.limit = cdp_settings.MAX_MESSAGE_BYTES
        self.options = function_options(connection)

    # --- shared pieces --------------------------------------------------------------------

    def _insert_messages(self, values: dict[str, str], source: str) -> str:
        """``INSERT INTO message (…) SELECT … FROM source``: every column of the outbox
        given a value or left to its database default."""
        columns, exprs = [], []
        for field in Message._meta.concrete_fields:
            if field.primary_key:
                continue
            if field.attname in values:
                columns.append(self.q(column(field)))
                exprs.append(values[field.attname])
            elif field.db_default is NOT_PROVIDED and not field.null:
                raise ValueError(f"the trigger engine gives no value to Message.{field.attname}")
        return (
            f"INSERT INTO {self.message} ({', '.join(columns)}) "
            f"SELECT {', '.join(exprs)} FROM {source}"
        )

    def _decided(self, minimal: str, where: str) -> dict[str, str]:
        """Status, reason and payload of the rows of a CTE ``m`` (:meth:`_measured`)."""
        return outcome("m.text", "m.size", minimal, "m.err", "m.uid", where, self.limit)

    @staticmethod
    def _measured(message: str, rows: str = "b") -> str:
        """SELECT of ``rows`` with their message's text and its size, each computed once."""
        return (
            f"SELECT {rows}.*, t.text, octet_length(t.text) AS size FROM {rows}, "
            f"LATERAL (SELECT ({message})::text AS text {FENCE}) t {FENCE}"
        )

    def _row_values(
        self,
        kind: str,
        event: str,
        source_model: str,
        capture: str,
        where: str,
        minimal: str,
        made: str | None = None,
    ) -> dict[str, str]:
        """Column values of a message row built in a CTE ``m`` (text, size, err, uid, mid, pk),
        written now, or at ``made`` (an expanded statement's rows: when its transaction
        began, and due from then like the messages that transaction wrote at once, so that
        they go out in the order the transactions ran)."""
        decided = self._decided(minimal, where)
        values = {
            "message_id": "m.mid",
            "type": literal(kind),
            "event": event,
            "user_id": "COALESCE(m.uid, '')",
            "payload": decided["payload"],
            "status": decided["status"],
            "attempts": "0",
            "locked_by": "''",
            "last_error": decided["last_error"],
            "created_at": made or "clock_timestamp()",
            "source_model": literal(source_model),
            "source_pk": "m.pk",
            "violations": "'[]'::jsonb",
            "xid": "x",
            "capture": capture,
        }
        if made:
            values["next_attempt_at"] = made
        return values

    def _function(
        self,
        name: str,
        body: str,
        *,
        arguments: str = "",
        declare: str = "    written bigint;\n    flagged text;\n    one jsonb;\n",
    ) -> str:
        """A trigger function, or (with ``arguments``) a function returning nothing: the
        identity function takes the owners to identify, an expander its deferred statement."""
        returns = "void" if arguments else "trigger"
        return (
            f"CREATE OR REPLACE FUNCTION {self.q(name)}({arguments}) RETURNS {returns} "
            f"LANGUAGE plpgsql SECURITY DEFINER {self.options} AS {BODY_TAG}\n"
            "DECLARE\n    x bigint;\n    stamp text;\n    idp text;\n    ambient jsonb;\n"
            f"{declare}BEGIN\n{body}"
            f"\nEND\n{BODY_TAG};"
        )

    def _guard(self) -> str:
        return (
            f"    IF current_setting({literal(OFF_SETTING)}, true) = 'on' THEN\n"
            "        RETURN NULL;\n    END IF;\n"
            "    x := pg_current_xact_id()::text::bigint;\n"
            f"    stamp := {TIMESTAMP};\n"
            f"    idp := {MESSAGE_ID_PREFIX};\n"
            f"    ambient := {AMBIENT};\n"
        )

    def _identify_call(
        self, config: ModelConfig, rows: str, candidates: str = "", made: str = "NULL"
    ) -> str:
        """Re-identify the owners of ``rows`` (or of the array ``candidates``, gathered
        already): call the identity function only when one of them may need an identify.

        The identify belongs to the statement's transaction (``x``), time, message-id prefix
        and context (``stamp``, ``idp``, ``ambient``), and is due from ``made`` (an expanded
        statement's) or, NULL, from now: the caller's, or the stored statement's an expander
        read.

        Most changes leave their owner's traits as they were. Until this transaction has
        written an identify (:data:`IDENTIFIED_SETTING`), the last identify recorded for an
        owner is its ``TraitsDigest``, so one read of the owners' traits and digests decides
        it, in this function, without the identity function's lookups and writes.
        """
        identity = registry.configured_identity
        if not (config.identify or config.is_identity):
            return ""
        owner_pk, _ = self.sql.owner(config, identity, "r.j")
        if candidates:
            given = f"unnest({candidates}) o"
        else:
            given = f"(SELECT {owner_pk} AS o FROM {jsonb_rows(rows)} r) q"
        owners = f"ARRAY(SELECT DISTINCT o FROM {given} WHERE o IS NOT NULL)"
        call = (
            f"PERFORM {self.q(identify_function(identity))}({owners}, x, stamp, idp, ambient, "
            f"{made});"
        )
        if cdp_settings.SEND_UNCHANGED_IDENTIFY:
            return f"    {call}\n"
        traits, error = self.sql.traits(identity, "r.s")
        _, uid = self.sql.identity_owner(identity, "r.s")
        # The owners are gathered inside the check: one statement when nothing changed. The
        # check only matches them against the identity's pks, so it takes them as they come
        # (repeated, or NULL for a row without an owner): sorting out the distinct ones cost
        # every write about 22k instructions, and only the identity function needs them.
        candidates = candidates or f"ARRAY(SELECT {owner_pk} FROM {jsonb_rows(rows)} r)"
        changed = (
            f"EXISTS (SELECT 1 FROM {self._identity_rows(identity, candidates)} r "
            f"WHERE {error} IS NOT NULL OR md5(({traits})::text) IS DISTINCT FROM "
            f"(SELECT d.digest FROM {self.digests} d WHERE d.user_id = {uid}))"
        )
        return (
            f"    IF {self._flagged(IDENTIFIED_SETTING)} OR {changed} THEN\n"
            f"        {call}\n    END IF;\n"
        )

    @staticmethod
    def _flagged(setting: str) -> str:
        """Whether this transaction has set the flag ``setting`` (see :data:`TRACKED_SETTING`)."""
        return f"current_setting({literal(setting)}, true) = 'on'"

    @staticmethod
    def _flag(setting: str) -> str:
        """Set the flag ``setting`` when the statement just run wrote rows.

        An assignment, not ``PERFORM``: PL/pgSQL evaluates an expression that reads no table
        itself, where ``PERFORM`` runs a query (about 10k instructions more per write)."""
        return (
            "    GET DIAGNOSTICS written = ROW_COUNT;\n"
            f"    flagged := CASE WHEN written > 0 THEN set_config({literal(setting)}, 'on', true) "
            "END;\n"
        )

    def _withhold(self, config: ModelConfig, action: str, rows: str) -> str:
        """The statement counting the ``action`` events of owners without consent in ``rows``."""
        return consent.sql_withhold(
            self.sql, config, config.event_name(action), rows, self.withheld
        )

    def _open_entries(self, label: str, kind: str, keys: str) -> str:
        """This transaction's ``kind`` rows of ``label`` objects whose pk is in the ``keys``
        query (of distinct pks): their id, source_pk, message_id and capture.

        One exact match on the ``(source_model, source_pk, xid)`` index per key: each lookup
        is a fenced ``LATERAL`` subquery, so the plan cannot match ``source_pk`` as a filter
        after the index found every row of the model with this ``xid`` (a generic plan did,
        reading every message of the model the outbox held). ``capture`` is set until
        delivery claims a row, so a claimed row is never taken for one of this
        transaction's, whatever its ``xid`` (a database restored into a new cluster counts
        transaction ids from the start again).
        """
        return (
            f"SELECT m.* FROM ({keys}) k(pk), LATERAL (SELECT m.id, m.source_pk, m.message_id, "
            f"m.capture FROM {self.message} m WHERE m.source_model = {literal(label)} "
            "AND m.source_pk = k.pk AND m.xid = x AND m.capture IS NOT NULL "
            f"AND m.type = {literal(kind)} {FENCE}) m"
        )

    # --- one model ------------------------------------------------------------------------

    def model_sql(self, config: ModelConfig) -> ModelSql:
        identity = registry.configured_identity
        identify = self.identify_sql(identity) if (config.identify or config.is_identity) else ""
        functions = {
            "insert": self._insert_function(config),
            "update": self._update_function(config),
            "delete": self._delete_function(config),
        }
        expanders = {op: self._expander(config, op) for op in deferred_operations(config)}
        expand = self.expand_sql() if cdp_settings.DEFER_STATEMENT_ROWS is not None else ""
        text = "\n".join([SQL_VERSION, identify, expand, *functions.values(), *expanders.values()])
        digest = hashlib.md5(text.encode()).hexdigest()
        return ModelSql(config, functions, expanders, identify, expand, digest)

    def _built(self, config: ModelConfig, action: str) -> tuple[str, str]:
        """SELECT of the rows of ``b`` with their track's text (``m``), and the minimal
        message of a row of ``m`` that fails."""
        event = config.event_names.get(action, "")
        integrations = config.integrations
        msg = track_message(event, "b.uid", "b.props", integrations)
        return self._measured(msg), minimal_message("m.text", "track")

    def _base(
        self, config: ModelConfig, rows: str, extra: str = "", mid: str = NEW_MESSAGE_ID
    ) -> str:
        """SELECT per changed row: its jsonb ``j``, pk, owner, properties and their error;
        only the rows of owners with consent."""
        identity = registry.configured_identity
        _, uid = self.sql.owner(config, identity, "r.j")
        props, error = self.sql.properties(config, "r.j")
        return (
            f"SELECT r.*, {self.sql.pk_text(config.model, 'r.j')} AS pk, {uid} AS uid, "
            f"{props} AS props, {error} AS err, {mid} AS mid{extra} "
            f"FROM {consent.sql_consenting(self.sql, config, rows)} r"
        )

    # Each operation's messages are written by one statement built from the changed rows
    # (``rows``: a FROM item with the jsonb ``j`` of each row, an update's also with ``oj``,
    # the row before). The trigger function runs it on the statement's transition tables;
    # an expander (:meth:`_expander`) runs the same statement on a deferred statement's
    # stored rows, with ``made``, the time the statement ran.

    def _created(
        self,
        config: ModelConfig,
        rows: str,
        *,
        made: str | None = None,
    ) -> str:
        """The INSERT of the ``Created`` rows of ``rows``."""
        label = config.model._meta.label_lower
        where = self.sql.describe(config.model, "m.j")
        capture = "jsonb_build_object('action', 'created', 'current', m.cur)"
        built, minimal = self._built(config, CREATED)
        event = literal(config.event_name(CREATED))
        values = self._row_values("track", event, label, capture, where, minimal, made)
        tracked = self.sql.tracked(config, "r.j")
        base = self._base(config, rows, f", {tracked} AS cur")
        return self._insert_messages(values, f"(WITH b AS ({base}) {built}) m")

    def _insert_function(self, config: ModelConfig) -> str:
        rows = jsonb_rows("new_rows")
        main = withhold = ""
        if CREATED in config.events:
            main = f"    {self._created(config, rows)};\n" + self._flag(TRACKED_SETTING)
            withhold = self._withhold(config, CREATED, rows)
        body = self._guard() + self._deferring(config, "insert", main) + withhold
        body += self._identify_call(config, "new_rows")
        body += "    RETURN NULL;"
        return self._function(function_name(config, "insert"), body)

    def _pairs(self, config: ModelConfig) -> str:
        """The rows of an UPDATE: each row's jsonb ``j`` with ``oj``, the row before."""
        pk = self.q(column(config.model._meta.pk))
        return (
            f"(SELECT to_jsonb(n) AS j, to_jsonb(o) AS oj FROM new_rows n "
            f"JOIN old_rows o ON o.{pk} = n.{pk} {FENCE})"
        )

    def _updated(
        self,
        config: ModelConfig,
        pairs: str,
        *,
        combine: bool,
        made: str | None = None,
    ) -> str:
        """The statement writing the messages of an update's ``pairs``: combined with the rows
        this transaction wrote for the same objects (``combine``), or, when it has written
        none, new ``Updated`` rows only."""
        label = config.model._meta.label_lower
        pk_c = self.sql.pk_text(config.model, "c.j")
        updated = "TRUE" if UPDATED in config.events else "FALSE"
        integrations = config.integrations
        # The implicit identity entry (not in MODELS) has no events, and so no names.
        created_event = config.event_names.get(CREATED, "")
        updated_event = config.event_names.get(UPDATED, "")
        with_changes = "b.props || jsonb_build_object('changed_fields', to_jsonb(b.changed))"

        def by_action(created: str, otherwise: str) -> str:
            return f"CASE WHEN b.action = 'created' THEN {created} ELSE {otherwise} END"

        updated_msg = track_message(updated_event, "b.uid", with_changes, integrations)
        minimal = minimal_message("m.text", "track")
        updated_capture = "jsonb_build_object('action', 'updated', 'reference', b.ref)"
        where = self.sql.describe(config.model, "m.j")
        # The rows that write or rewrite a message, and their messages.
        base = self._base(config, "f", "", f"COALESCE(r.entry_mid, {NEW_MESSAGE_ID})")
        b = (
            f"b AS ({base} WHERE "
            "(r.action = 'created' AND r.cur IS DISTINCT FROM r.last) "
            "OR (r.action = 'updated' AND cardinality(r.changed) > 0) "
            f"OR (r.action IS NULL AND cardinality(r.changed) > 0 AND {updated}))"
        )
        if not combine:
            # No track row of this transaction to combine with: new Updated rows only, written
            # without the Created branches (PostgreSQL prepares every branch of a CASE each
            # time a statement runs, taken or not).
            changed = self.sql.changed_fields(config, "r.oj", "r.j", rows=True)
            first = [
                "f AS (SELECT r.j, NULL::bigint AS entry_id, NULL::text AS entry_mid, "
                "NULL::text AS action, NULL::jsonb AS cur, NULL::jsonb AS last, "
                f"{self.sql.tracked(config, 'r.oj')} AS ref, {changed} AS changed "
                f"FROM {pairs} r {FENCE})",
                b,
                f"m AS ({self._measured(updated_msg)})",
            ]
            capture = updated_capture.replace("b.", "m.")
            event = literal(updated_event)
            values = self._row_values("track", event, label, capture, where, minimal, made)
            return "WITH " + ",\n    ".join(first) + f"\n    {self._insert_messages(values, 'm')}"
        msg = by_action(track_message(created_event, "b.uid", "b.props", integrations), updated_msg)
        event = by_action(literal(created_event), literal(updated_event)).replace("b.", "m.")
        capture = by_action(
            "jsonb_build_object('action', 'created', 'current', b.cur)", updated_capture
        ).replace("b.", "m.")
        values = self._row_values("track", event, label, capture, where, minimal, made)
        decided = self._decided(minimal, where)
        combined = [
            f"c AS (SELECT r.j, {self.sql.tracked(config, 'r.j')} AS cur, "
            f"{self.sql.tracked(config, 'r.oj')} AS old FROM {pairs} r {FENCE})",
            f"e AS ({self._open_entries(label, 'track', f'SELECT {pk_c} FROM c')})",
            # ref: the values at the transaction's start, for the net change.
            "d AS (SELECT c.*, e.id AS entry_id, e.message_id AS entry_mid, "
            "e.capture->>'action' AS action, "
            "CASE WHEN e.capture->>'action' = 'updated' THEN e.capture->'reference' "
            f"ELSE c.old END AS ref, e.capture->'current' AS last FROM c LEFT JOIN e "
            f"ON e.source_pk = {pk_c})",
            f"f AS (SELECT d.*, {self.sql.changed_fields(config, 'd.ref', 'd.cur')} AS changed "
            f"FROM d {FENCE})",
            b,
            f"m AS ({self._measured(msg)})",
            # An update whose changes cancelled out: its message goes.
            f"gone AS (DELETE FROM {self.message} WHERE id IN (SELECT entry_id FROM f "
            "WHERE action = 'updated' AND cardinality(changed) = 0))",
            f"rewritten AS (UPDATE {self.message} t SET payload = {decided['payload']}, "
            f"status = {decided['status']}, last_error = {decided['last_error']}, "
            f"user_id = COALESCE(m.uid, ''), event = {event}, capture = {capture} "
            "FROM m WHERE t.id = m.entry_id)",
        ]
        insert = self._insert_messages(values, "(SELECT * FROM m WHERE m.entry_id IS NULL) m")
        return "WITH " + ",\n    ".join(combined) + f"\n    {insert}"

    def _update_function(self, config: ModelConfig) -> str:
        pairs = self._pairs(config)
        main = f"    IF {self._flagged(TRACKED_SETTING)} THEN\n"
        main += f"    {self._updated(config, pairs, combine=True)};\n"
        if UPDATED in config.events:
            main += f"    ELSE\n    {self._updated(config, pairs, combine=False)};\n"
            main += self._flag(TRACKED_SETTING)
        main += "    END IF;\n"
        withhold = ""
        if UPDATED in config.events:
            changed = f"{self.sql.tracked(config, 'q.j')} IS DISTINCT FROM "
            changed += self.sql.tracked(config, "q.oj")
            withhold = self._withhold(config, UPDATED, f"(SELECT * FROM {pairs} q WHERE {changed})")
        body = self._guard() + self._deferring(config, "update", main) + withhold
        body += self._identify_call(config, "new_rows")
        body += "    RETURN NULL;"
        return self._function(function_name(config, "update"), body)

    def _deleted(
        self,
        config: ModelConfig,
        rows: str,
        *,
        combine: bool,
        made: str | None = None,
    ) -> str:
        """The statement writing the ``Deleted`` rows of ``rows``: taking back the rows this
        transaction wrote for the same objects (``combine``), or a plain insert."""
        label = config.model._meta.label_lower
        identity = registry.configured_identity
        deleted = "TRUE" if DELETED in config.events else "FALSE"
        where = self.sql.describe(config.model, "m.j")
        built, minimal = self._built(config, DELETED)
        event = literal(config.event_names.get(DELETED, ""))
        values = self._row_values("track", event, label, "NULL", where, minimal, made)
        insert = self._insert_messages(values, "m")
        if not combine:
            first = [f"b AS ({self._base(config, rows)})", f"m AS ({built})"]
            return "WITH " + ",\n    ".join(first) + f"\n    {insert}"
        pk_c = self.sql.pk_text(config.model, "c.j")
        ctes = [
            f"c AS (SELECT * FROM {rows} o)",
            f"e AS ({self._open_entries(label, 'track', f'SELECT {pk_c} FROM c')})",
            f"gone AS (DELETE FROM {self.message} WHERE id IN (SELECT id FROM e))",
        ]
        if config.is_identity:
            # The owner goes: its identify of this transaction goes too, with the digest.
            identity_label = identity.model._meta.label_lower
            ctes += [
                f"idgone AS (DELETE FROM {self.message} m WHERE m.id IN (SELECT id FROM "
                f"({self._open_entries(identity_label, 'identify', f'SELECT {pk_c} FROM c')}) "
                "i) RETURNING m.user_id, m.message_id)",
                f"forgot AS (DELETE FROM {self.digests} d USING idgone "
                "WHERE d.user_id = idgone.user_id AND d.message_id = idgone.message_id)",
            ]
        kept = (
            "(SELECT c.j FROM c LEFT JOIN e ON e.source_pk = "
            f"{pk_c} WHERE e.capture->>'action' IS DISTINCT FROM 'created' AND {deleted})"
        )
        ctes += [
            f"b AS ({self._base(config, kept)})",
            f"m AS ({built})",
        ]
        return "WITH " + ",\n    ".join(ctes) + f"\n    {insert}"

    def _delete_function(self, config: ModelConfig) -> str:
        rows = jsonb_rows("old_rows")
        # Rows of this transaction to take back: its track rows of these objects, and (for
        # owners) their identify rows. Without them, a plain insert of the Deleted rows.
        combine = self._flagged(TRACKED_SETTING)
        if config.is_identity:
            combine += f" OR {self._flagged(IDENTIFIED_SETTING)}"
        main = f"    IF {combine} THEN\n    {self._deleted(config, rows, combine=True)};\n"
        if DELETED in config.events:
            main += f"    ELSE\n    {self._deleted(config, rows, combine=False)};\n"
            main += self._flag(TRACKED_SETTING)
        main += "    END IF;\n"
        withhold = self._withhold(config, DELETED, rows) if DELETED in config.events else ""
        body = self._guard() + self._deferring(config, "delete", main) + withhold
        if not config.is_identity:
            body += self._identify_call(config, "old_rows")
        body += "    RETURN NULL;"
        return self._function(function_name(config, "delete"), body)

    # --- deferred statements ----------------------------------------------------------------

    def _deferring(self, config: ModelConfig, operation: str, main: str) -> str:
        """``main`` (the statements writing the messages of the trigger's statement), with
        what deferred statements need around it.

        A statement of at least ``DEFER_STATEMENT_ROWS`` rows of a deferrable model is stored
        whole instead, while its transaction has written no track row (the rows of later
        statements can combine with its messages once they exist, not the other way round).
        Any other statement first expands what its transaction deferred, so that it finds
        those messages to combine with.
        """
        limit = cdp_settings.DEFER_STATEMENT_ROWS
        if limit is None:
            return main
        expand_first = (
            f"    IF {self._flagged(DEFERRED_SETTING)} THEN "
            f"PERFORM {self.q(EXPAND_FUNCTION)}(ARRAY[x]); END IF;\n"
        )
        if operation not in deferred_operations(config):
            return expand_first + main
        transition = "old_rows" if operation == "delete" else "new_rows"
        if operation == "update":
            rows, stored = self._pairs(config), "jsonb_build_array(q.j, q.oj)"
        else:
            rows, stored = jsonb_rows(transition), "q.j"
        # The rows are stored in parts of at most STORE_ROWS rows and about STORE_BYTES
        # bytes: a jsonb value cannot exceed 256 MB, and a statement must never fail on it.
        columns = (
            f"INSERT INTO {self.deferred} (xid, source_model, operation, expander, rows, "
            "row_count, stamp, message_id_prefix, ambient, created_at)"
        )
        constants = (
            f"x, {literal(config.model._meta.label_lower)}, {literal(operation)}, "
            f"{literal(expander_name(config, operation))}"
        )
        in_parts = (
            f"WITH p AS (SELECT s, (row_number() OVER w - 1) / {STORE_ROWS} AS by_rows, "
            f"sum(pg_column_size(s)) OVER w / {STORE_BYTES} AS by_size "
            f"FROM (SELECT {stored} AS s FROM {rows} q) q "
            "WINDOW w AS (ROWS UNBOUNDED PRECEDING)), "
            f"stored AS ({columns} SELECT {constants}, jsonb_agg(s), count(*), "
            "stamp, idp, ambient, now() FROM p GROUP BY by_rows, by_size "
            "RETURNING 1) "
            "SELECT count(*) FROM stored INTO written;\n"
        )
        # Stored with now(), its transaction's start (see _row_values). A deferred statement's
        # function ends in its branch (``written``: the parts stored): its owners are
        # re-identified when it is expanded (see _expander).
        stored_whole = (
            "        IF written > 0 THEN\n"
            f"            flagged := set_config({literal(DEFERRED_SETTING)}, 'on', true);\n"
            "            RETURN NULL;\n"
            "        END IF;\n"
        )
        tracked = self._flagged(TRACKED_SETTING)
        if limit == 1:
            # Every statement is deferred, most of them of one row: one query takes up to
            # two rows, as the value to store, and a statement of one row is stored with a
            # plain INSERT (the windowed store costs a single-row write about 80k
            # instructions more). A statement of no rows (Django's fast delete of an empty
            # set, the UPDATE that save() tries before an INSERT) has nothing to write and
            # nothing to expand first; an update whose rows do not pair (changed primary
            # keys) goes on to the statement that writes its messages.
            return (
                f"    IF NOT {tracked} THEN\n"
                f"        SELECT count(*), jsonb_agg({stored}) INTO written, one "
                f"FROM (SELECT * FROM {rows} q LIMIT 2) q;\n"
                "        IF written = 1 THEN\n"
                f"            {columns} VALUES ({constants}, one, 1, stamp, idp, ambient, "
                "now());\n"
                "        ELSIF written > 1 THEN\n"
                f"            {in_parts}"
                f"        ELSIF NOT EXISTS (SELECT 1 FROM {transition}) THEN\n"
                "            RETURN NULL;\n"
                "        END IF;\n"
                f"{stored_whole}"
                f"    {expand_first}"
                "    END IF;\n"
                f"{main}"
            )
        # Counting the transition table is a query, which every single-row write would pay
        # for (about 20k instructions). The rows this backend has written to the table and not
        # yet reported to the statistics (the statement's among them, so never fewer) are a
        # plain function call: the table is counted only when they could be enough. A
        # transaction with deferred statements has written no track row (they are expanded
        # before one is), so the common case, neither, costs one expression.
        counted = {"insert": "inserted", "update": "updated", "delete": "deleted"}[operation]
        stat = f"pg_stat_get_xact_tuples_{counted}(TG_RELID) >= {limit}"
        return (
            f"    IF NOT {tracked} AND ({self._flagged(DEFERRED_SETTING)} OR {stat}) THEN\n"
            f"        IF {stat} AND EXISTS (SELECT 1 FROM {transition} OFFSET {limit - 1}) THEN\n"
            f"            {in_parts}"
            "        END IF;\n"
            f"{stored_whole}"
            f"    {expand_first}"
            "    END IF;\n"
            f"{main}"
        )

    def _expander(self, config: ModelConfig, operation: str) -> str:
        """The function writing the messages of one deferred statement of ``operation``:
        the trigger's statement, on the stored rows, combined with what the transaction
        wrote before (its earlier deferred statements, expanded in order); then the owners'
        re-identify, as the trigger does after its statement, with the traits they have now.

        The re-identify waits for the expansion too: its digest check (the owners' rows,
        their traits as JSON, an md5, three index lookups) was half of what a single-row
        write cost the trigger, and an owner whose traits changed meanwhile is identified
        with the traits it has, which are the ones to send.
        """
        rows = "(SELECT e AS j FROM jsonb_array_elements(data) e)"
        if operation == "insert":
            statement = self._created(config, rows, made="made")
        elif operation == "update":
            pairs = "(SELECT e->0 AS j, e->1 AS oj FROM jsonb_array_elements(data) e)"
            statement = self._updated(config, pairs, combine=True, made="made")
        else:
            statement = self._deleted(config, rows, combine=True, made="made")
        body = (
            "    SELECT s.xid, s.stamp, s.message_id_prefix, s.ambient, s.rows, s.created_at "
            f"INTO x, stamp, idp, ambient, data, made FROM {self.deferred} s "
            "WHERE s.id = statement;\n"
            "    IF NOT FOUND THEN RETURN; END IF;\n"
            f"    {statement};\n"
        )
        identify = self._identify_call(config, "", "candidates", made="made")
        if identify:
            first = "e->0" if operation == "update" else "e"  # an update's owners: new rows'
            owner_pk, _ = self.sql.owner(config, registry.configured_identity, f"({first})")
            body += (
                f"    candidates := ARRAY(SELECT {owner_pk} FROM jsonb_array_elements(data) e);\n"
                f"{identify}"
            )
        declare = "    data jsonb;\n    made timestamptz;\n    candidates text[];\n"
        return self._function(
            expander_name(config, operation), body, arguments="statement bigint", declare=declare
        )

    def expand_sql(self) -> str:
        """The function that expands deferred statements, in the order they ran: those of
        the transactions in ``xids`` (a trigger's or ``expand_own``: its own; delivery: the
        batch it chose), or every one it can see (NULL: ``cdp_triggers install`` /
        ``uninstall``). A statement whose expander is gone (its model's triggers
        uninstalled) stays where it is rather than failing the caller."""
        return (
            f"CREATE OR REPLACE FUNCTION {self.q(EXPAND_FUNCTION)}(xids bigint[]) "
            f"RETURNS integer LANGUAGE plpgsql SECURITY DEFINER {self.options} AS {BODY_TAG}\n"
            "DECLARE\n    s record;\n    n integer := 0;\n"
            "    own bigint := pg_current_xact_id()::text::bigint;\nBEGIN\n"
            # Every one: the transactions of all. So that each query below matches on the xid
            # index (with "xids IS NULL OR …" a generic plan reads the whole table, and a
            # trigger that expands its own transaction's statements would pay for a backlog).
            "    IF xids IS NULL THEN\n"
            f"        xids := ARRAY(SELECT DISTINCT d.xid FROM {self.deferred} d);\n"
            "    END IF;\n"
            f"    FOR s IN SELECT d.id, d.xid, d.expander FROM {self.deferred} d "
            f"WHERE d.xid = ANY(xids) AND {EXPANDER_EXISTS.format('d.expander')} "
            "ORDER BY d.id FOR UPDATE LOOP\n"
            # Another transaction's statement (delivery): the identifies this one wrote are
            # not that transaction's, so its re-identify starts from the digests (the
            # identity function finds that transaction's own identify by its xid).
            "        IF s.xid <> own THEN\n"
            f"            PERFORM set_config({literal(IDENTIFIED_SETTING)}, '', true);\n"
            "        END IF;\n"
            "        EXECUTE format('SELECT %I($1)', s.expander) USING s.id;\n"
            f"        DELETE FROM {self.deferred} WHERE id = s.id;\n"
            "        n := n + 1;\n"
            "    END LOOP;\n"
            "    IF n > 0 THEN\n"
            # The messages exist now: later statements combine with them. Statements it could
            # not expand keep the flag (and their place): nothing combines with them until
            # they are.
            f"        PERFORM set_config({literal(TRACKED_SETTING)}, 'on', true);\n"
            f"        IF NOT EXISTS (SELECT 1 FROM {self.deferred} d "
            "WHERE d.xid = ANY(xids)) THEN\n"
            f"            PERFORM set_config({literal(DEFERRED_SETTING)}, '', true);\n"
            "        END IF;\n"
            "    END IF;\n"
            "    RETURN n;\n"
            f"END\n{BODY_TAG};"
        )

    # --- the identity ---------------------------------------------------------------------

    def _identity_rows(self, identity: IdentityConfig, owners: str) -> str:
        """The identity rows (jsonb ``s``) whose pks are in the array ``owners``, those of
        owners without consent left out."""
        pk = identity.model._meta.pk
        return jsonb_rows(
            self.sql.table(identity.model),
            name="s",
            where=f"t.{self.q(column(pk))} = ANY({owners}::{pk.cast_db_type(self.connection)}[]) "
            f"AND {consent.sql_grants(self.sql, identity, 'to_jsonb(t)')}",
        )

    def _traits_ctes(self, identity: IdentityConfig, owners: str) -> list[str]:
        """``cur`` (each owner in the array ``owners``: pk, userId, traits and their error)
        and ``dg`` (with the traits' digest)."""
        pk_s = self.sql.pk_text(identity.model, "r.s")
        _, uid = self.sql.identity_owner(identity, "r.s")
        traits, error = self.sql.traits(identity, "r.s")
        return [
            f"cur AS (SELECT r.s, {pk_s} AS pk, {uid} AS uid, {traits} AS traits, "
            f"{error} AS err FROM {self._identity_rows(identity, owners)} r {FENCE})",
            "dg AS (SELECT cur.*, CASE WHEN cur.err IS NULL THEN md5(cur.traits::text) END "
            f"AS digest FROM cur {FENCE})",
        ]

    def _identify_rows(
        self, identity: IdentityConfig, made: str | None = None
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Column values of an identify row built in ``m`` (written at ``made``, see
        :meth:`_row_values`), and its status/reason/payload."""
        where = self.sql.describe(identity.model, "m.s")
        minimal = minimal_message("m.text", "identify")
        values = self._row_values(
            "identify",
            "''",
            identity.model._meta.label_lower,
            "jsonb_build_object('digest', m.digest)",
            where,
            minimal,
            made,
        )
        return values, self._decided(minimal, where)

    def backfill_sql(self, identity: IdentityConfig, *, force: bool) -> str:
        """One statement that identifies a batch of owners (``%s``: an array of pk texts) whose
        traits differ from the last recorded (all of them with ``force``), as the identify
        function does: messages and digests written in the database, without a round trip per
        owner. Returns each written row's status, reason, pk and payload, with the number of
        owners found (one row of NULLs and that number when nothing was written).

        The rows carry the transaction's id, so delivery runs their Python part (the
        enrichment hook, validation, ``message_created``) when it claims them.
        """
        values, _ = self._identify_rows(identity)
        changed = (
            "TRUE"
            if force
            else f"dg.digest IS NULL OR dg.digest IS DISTINCT FROM "
            f"(SELECT d.digest FROM {self.digests} d WHERE d.user_id = dg.uid)"
        )
        ctes = [
            f"v AS (SELECT pg_current_xact_id()::text::bigint AS x, {TIMESTAMP} AS stamp, "
            f"{AMBIENT} AS ambient, {MESSAGE_ID_PREFIX} AS idp, "
            # Its identify rows are this transaction's: later triggers combine with them.
            f"set_config({literal(IDENTIFIED_SETTING)}, 'on', true) AS flagged)",
            *self._traits_ctes(identity, "%s"),
            f"p AS (SELECT dg.*, {NEW_MESSAGE_ID} AS mid, v.x, v.stamp, v.ambient FROM dg, v "
            f"WHERE {changed})",
            f"m AS ({self._measured(identify_message('p.uid', 'p.traits'), 'p')})",
            f"inserted AS ({self._insert_messages(values, 'm')} "
            "RETURNING user_id, message_id, status, last_error, source_pk, payload, "
            "capture->>'digest' AS digest)",
            f"recorded AS (INSERT INTO {self.digests} (user_id, digest, message_id, updated_at) "
            "SELECT i.user_id, i.digest, i.message_id, clock_timestamp() FROM inserted i "
            "WHERE i.status = 'pending' ON CONFLICT (user_id) DO UPDATE SET "
            "digest = EXCLUDED.digest, message_id = EXCLUDED.message_id, "
            "updated_at = EXCLUDED.updated_at)",
        ]
        return (
            "WITH " + ",\n".join(ctes) + "\n"
            "SELECT i.status, i.last_error, i.source_pk, i.payload, f.found "
            "FROM (SELECT count(*) AS found FROM cur) f LEFT JOIN inserted i ON TRUE"
        )

    def identify_sql(self, identity: IdentityConfig) -> str:
        label = identity.model._meta.label_lower
        unchanged = "TRUE" if cdp_settings.SEND_UNCHANGED_IDENTIFY else "FALSE"
        new_rows = "(SELECT * FROM m WHERE m.entry_id IS NULL) m"
        values, decided = self._identify_rows(identity, made="COALESCE(made, now())")
        reads = [
            *self._traits_ctes(identity, "owners"),
            f"e AS ({self._open_entries(label, 'identify', 'SELECT pk FROM cur')})",
        ]
        # The owners to identify: traits that cannot be sent, or that differ from this
        # transaction's identify, or (without one) from the last identify recorded.
        wanted = (
            "FROM dg LEFT JOIN e ON e.source_pk = dg.pk WHERE CASE WHEN e.id IS NOT NULL "
            "THEN dg.digest IS NULL OR dg.digest IS DISTINCT FROM e.capture->>'digest' "
            f"ELSE dg.digest IS NULL OR {unchanged} OR dg.digest IS DISTINCT FROM "
            f"(SELECT d.digest FROM {self.digests} d WHERE d.user_id = dg.uid) END"
        )
        writes = [
            "p AS (SELECT dg.*, e.id AS entry_id, COALESCE(e.message_id, "
            f"{NEW_MESSAGE_ID}) AS mid {wanted})",
            f"m AS ({self._measured(identify_message('p.uid', 'p.traits'), 'p')})",
            f"rewritten AS (UPDATE {self.message} t SET payload = {decided['payload']}, "
            f"status = {decided['status']}, last_error = {decided['last_error']}, "
            "user_id = COALESCE(m.uid, ''), capture = jsonb_build_object('digest', m.digest) "
            "FROM m WHERE t.id = m.entry_id "
            "RETURNING t.user_id, t.message_id, t.status, m.digest)",
            f"inserted AS ({self._insert_messages(values, new_rows)} "
            "RETURNING user_id, message_id, status, capture->>'digest' AS digest)",
            "written AS (SELECT * FROM rewritten UNION ALL SELECT * FROM inserted)",
            f"forgot AS (DELETE FROM {self.digests} d USING rewritten w "
            "WHERE w.status <> 'pending' AND d.user_id = w.user_id "
            "AND d.message_id = w.message_id)",
        ]
        body = (
            "    IF owners IS NULL OR cardinality(owners) = 0 THEN RETURN; END IF;\n"
            "    x := at_x;\n"
            # Most changes leave the traits as they were: find that out with reads alone.
            f"    IF NOT EXISTS (WITH {', '.join(reads)} SELECT 1 {wanted}) THEN RETURN; END IF;\n"
            "    stamp := at_stamp;\n"
            "    idp := at_idp;\n"
            "    ambient := at_ambient;\n"
            "    WITH " + ",\n    ".join(reads + writes) + "\n"
            f"    INSERT INTO {self.digests} (user_id, digest, message_id, updated_at) "
            "SELECT w.user_id, w.digest, w.message_id, clock_timestamp() FROM written w "
            "WHERE w.status = 'pending' ON CONFLICT (user_id) DO UPDATE SET "
            "digest = EXCLUDED.digest, message_id = EXCLUDED.message_id, "
            "updated_at = EXCLUDED.updated_at;\n"
            # Past the early return, an identify row was written or rewritten.
            f"    PERFORM set_config({literal(IDENTIFIED_SETTING)}, 'on', true);"
        )
        # The caller's transaction, time, id prefix and context, or those of the statement
        # an expander expands (then also ``made``: the messages are due from then).
        arguments = (
            "owners text[], at_x bigint, at_stamp text, at_idp text, at_ambient jsonb, "
            "made timestamptz"
        )
        return self._function(identify_function(identity), body, arguments=arguments, declare="")


# --- installation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """What one database holds of one model's triggers."""

    label: str
    engine: str
    reason: str
    installed: bool
    current: bool

    @property
    def ok(self) -> bool:
        return self.engine != engines.TRIGGERS or (self.installed and self.current)

    @property
    def state(self) -> str:
        if self.engine != engines.TRIGGERS:
            return "installed (not used)" if self.installed else "-"
        if not self.installed:
            return "missing"
        return "current" if self.current else "outdated"


def databases() -> list[str]:
    """The PostgreSQL aliases that may hold the outbox."""
    return [
        alias
        for alias in connections
        if connections[alias].vendor == "postgresql" and router.allow_migrate_model(alias, Message)
    ]


def _ours(connection: BaseDatabaseWrapper, query: str) -> list[tuple]:
    """The rows of a catalog query whose ``%s`` matches names starting with :data:`PREFIX`."""
    with connection.cursor() as cursor:
        cursor.execute(query, [PREFIX.replace("_", "\\_") + "%"])
        return cursor.fetchall()


def _installed(connection: BaseDatabaseWrapper) -> dict[tuple[str, str], str]:
    """(table, trigger name) -> comment of every django-cdp trigger in the database."""
    rows = _ours(
        connection,
        "SELECT c.relname, t.tgname, COALESCE(obj_description(t.oid, 'pg_trigger'), '') "
        "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE NOT t.tgisinternal AND t.tgname LIKE %s",
    )
    return {(table, name): comment for table, name, comment in rows}


def _functions(connection: BaseDatabaseWrapper) -> list[str]:
    rows = _ours(
        connection,
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = current_schema() AND p.proname LIKE %s",
    )
    return [row[0] for row in rows]


def _comment(digest: str) -> str:
    return f"django-cdp {digest}"


def status(using: str) -> list[Status]:
    """Each registered model's engine on ``using`` and the state of its triggers."""
    connection = connections[using]
    installed = _installed(connection) if connection.vendor == "postgresql" else {}
    generator = Generator(connection) if connection.vendor == "postgresql" else None
    out = []
    for config in registry:
        choice = engines.choose(config, connection.vendor)
        table = config.model._meta.db_table
        comments = [installed.get((table, trigger_name(op))) for op in OPERATIONS]
        present = all(c is not None for c in comments)
        current = False
        if present and choice.engine == engines.TRIGGERS and generator is not None:
            wanted = _comment(generator.model_sql(config).digest)
            current = all(c == wanted for c in comments)
        out.append(Status(config.label, choice.engine, choice.reason, present, current))
    return out


def install(using: str, *, force: bool = False) -> list[str]:
    """Install or update the triggers of every model captured by triggers on ``using``, and
    remove django-cdp triggers nobody wants; one transaction. Returns what changed."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return []
    configs = engines.trigger_configs(using)
    installed = _installed(connection)
    if not configs and not installed:
        return []  # nothing wanted, nothing to remove (a settings change in most tests)
    generator = Generator(connection)
    wanted = [generator.model_sql(c) for c in configs]
    changes: list[str] = []
    statements: list[str] = []
    keep_tables = {w.table for w in wanted}
    changed_tables = {table for table, _ in installed if table not in keep_tables}
    for (table, name), _ in sorted(installed.items()):
        if table not in keep_tables:
            statements.append(f"DROP TRIGGER IF EXISTS {generator.q(name)} ON {generator.q(table)}")
            changes.append(f"removed {name} on {table}")
    todo = [
        w
        for w in wanted
        if force
        or any(
            installed.get((w.table, trigger_name(op))) != _comment(w.digest) for op in OPERATIONS
        )
    ]
    if todo:
        shared = [w.expand for w in todo] + [w.identify for w in todo]
        statements.extend(dict.fromkeys(sql for sql in shared if sql))
    for model_sql in todo:
        table = generator.q(model_sql.table)
        changed_tables.add(model_sql.table)
        for op, expander in model_sql.expanders.items():
            # Only the expanding function (SECURITY DEFINER, as the owner) calls it, in order.
            statements.append(expander)
            statements.append(
                f"REVOKE ALL ON FUNCTION {generator.q(expander_name(model_sql.config, op))}"
                "(bigint) FROM PUBLIC"
            )
        for op in OPERATIONS:
            statements.append(model_sql.functions[op])
            name = generator.q(trigger_name(op))
            statements.append(
                f"CREATE OR REPLACE TRIGGER {name} AFTER {op.upper()} ON {table} "
                f"{REFERENCING[op]} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION {generator.q(function_name(model_sql.config, op))}()"
            )
            statements.append(
                f"COMMENT ON TRIGGER {name} ON {table} IS {literal(_comment(model_sql.digest))}"
            )
        changes.append(f"installed {model_sql.config.label}")
    if not statements:
        return changes
    keep = {function_name(w.config, op) for w in wanted for op in OPERATIONS}
    keep |= {expander_name(w.config, op) for w in wanted for op in w.expanders}
    keep |= {EXPAND_FUNCTION for w in wanted if w.expand}
    if wanted:
        keep.add(identify_function(registry.configured_identity))
    with transaction.atomic(using=using):
        # What was deferred is expanded by the functions it was written for, before they
        # change or go: once the tables' writers are done (a transaction still open may be
        # deferring a statement), which the triggers' DDL waits for anyway.
        _lock(connection, changed_tables)
        expand_pending(connection)
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        _drop_functions(connection, keep)
    return changes


def _lock(connection: BaseDatabaseWrapper, tables: Iterable[str]) -> None:
    """Wait for the transactions writing ``tables`` and keep new ones out (the lock that
    ``CREATE TRIGGER`` and ``DROP TRIGGER`` take; reads go on)."""
    names = ", ".join(connection.ops.quote_name(t) for t in sorted(tables))
    if names:
        with connection.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE")


def expand_pending(connection: BaseDatabaseWrapper, xids: list[int] | None = None) -> int:
    """Expand the deferred statements ``connection`` sees (its transaction's own, and
    committed ones) of the transactions ``xids``, or all of them, if the expanding function
    is installed; returns how many."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regproc(%s) IS NOT NULL", [EXPAND_FUNCTION])
        if not cursor.fetchone()[0]:
            return 0
        function = connection.ops.quote_name(EXPAND_FUNCTION)
        cursor.execute(f"SELECT {function}(%s::bigint[])", [xids])
        return cursor.fetchone()[0]


def _drop_functions(connection: BaseDatabaseWrapper, keep: Iterable[str]) -> None:
    keep = set(keep)
    with connection.cursor() as cursor:
        for signature in _functions(connection):
            if signature.split("(", 1)[0].strip('"') not in keep:
                cursor.execute(f"DROP FUNCTION IF EXISTS {signature}")


def uninstall(using: str) -> list[str]:
    """Remove every django-cdp trigger and function from ``using``."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return []
    installed = _installed(connection)
    q = connection.ops.quote_name
    with transaction.atomic(using=using), connection.cursor() as cursor:
        _lock(connection, {table for table, _ in installed})
        expand_pending(connection)
        for table, name in sorted(installed):
            cursor.execute(f"DROP TRIGGER IF EXISTS {q(name)} ON {q(table)}")
        _drop_functions(connection, ())
    return [f"removed {name} on {table}" for table, name in sorted(installed)]


# --- when ----------------------------------------------------------------------------------------


def on_migrate(sender: Any, using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    """``post_migrate``: install or update the triggers once every app's tables are there."""
    if using in databases():
        for change in install(using):
            logger.info("django-cdp: %s", change)


@receiver(setting_changed)
def _reinstall_on_change(*, setting: str, **kwargs: Any) -> None:
    """``override_settings(DJANGO_CDP=...)`` in tests: the triggers follow the new plan."""
    if setting != SETTING_NAME:
        return
    for alias in databases():
        try:
            install(alias)
        except (RuntimeError, AssertionError):
            # The test may not touch the database (pytest-django, SimpleTestCase): nothing
            # can be written there either, and the next change that can installs them.
            continue
