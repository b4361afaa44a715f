"""Consent: whose messages are written at all (``DJANGO_CDP["CONSENT"]``).

A customer who opted out must stop being tracked, including by the server-side
events that keep firing after the browser's SDK went quiet. ``CONSENT`` names
where the answer is:

* a field path on the identity model, a ``BooleanField``
  (``"analytics_opt_in"``, or ``"settings__analytics_opt_in"`` through foreign
  keys): read in the database, by the trigger engine in the statement of the
  change, and by the signal engine with one query;
* a dotted path to a function of the owner (an identity-model instance)
  returning a bool: Python only, so every model is captured by the signal
  engine (``CAPTURE = "triggers"`` is check ``E013``).

Consent is given, not presumed: only ``True`` lets an owner's messages through
(``False`` and ``NULL`` withhold them; a function that raises withholds them
and is logged). For an owner without consent no message is written, tracks and
identifies alike; each withheld track is counted per event and hour in
:class:`~django_cdp.models.WithheldCount` (the health page and ``cdp_health``
show them), the message itself is not stored. ``{% cdp_snippet %}`` renders
nothing for such an owner, and ``cdp_backfill_identify`` skips them.
Withdrawing consent deletes nothing already written: erasure does
(``retention.erase_user``, ``cdp_purge --user-id``; docs/context-and-consent.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.core import checks
from django.core.signals import setting_changed
from django.db import models
from django.dispatch import receiver
from django.utils import timezone
from django.utils.module_loading import import_string

from django_cdp.fields import column
from django_cdp.models import WithheldCount, count_hour
from django_cdp.registry import IdentityConfig, ModelConfig, Source, _resolve_source, registry
from django_cdp.settings import SETTING_NAME, cdp_settings

if TYPE_CHECKING:  # the trigger engine imports this module: no import at run time
    from django_cdp.capture.sql import Builder

logger = logging.getLogger("django_cdp")

KEY = f"{SETTING_NAME}['CONSENT']"
DOC = "docs/context-and-consent.md"


@dataclass(frozen=True)
class Consent:
    """``CONSENT`` parsed: a field ``source`` or a ``function``, or why it is broken."""

    source: Source | None = None
    function: Callable[[models.Model], Any] | None = None
    problem: str = ""


_cache: dict[str, Consent] = {}


def is_function_path(value: str) -> bool:
    """A dotted path names a function; field paths are joined with ``__``."""
    return "." in value


def parse(value: Any, identity: IdentityConfig | None) -> Consent:
    """``CONSENT`` as a :class:`Consent`; ``problem`` says why it cannot be used."""
    if not isinstance(value, str) or not value:
        return Consent(problem=f"{KEY} must be a field path or a dotted path, not {value!r}.")
    if is_function_path(value):
        try:
            function = import_string(value)
        except Exception as exc:
            return Consent(
                problem=f"{KEY} = {value!r} cannot be imported: {type(exc).__name__}: {exc}"
            )
        if not callable(function):
            return Consent(problem=f"{KEY} = {value!r} is not a function.")
        return Consent(function=function)
    if identity is None:
        return Consent(problem=f"{KEY} = {value!r} needs an IDENTITY model to be read on.")
    source = _resolve_source(identity.model, "consent", value)
    if isinstance(source, str):
        return Consent(problem=f"{KEY} = {value!r} does not resolve: {source}")
    kind = source.field.get_internal_type() if source.field is not None else "a property"
    if kind != "BooleanField":
        return Consent(
            problem=f"{KEY} = {value!r} is {kind} of {identity.model._meta.label}, "
            "not a BooleanField."
        )
    return Consent(source=source)


def current() -> Consent | None:
    """The configured consent, or None when ``CONSENT`` is unset (everyone's messages are
    written) or broken (check ``E015`` reports it; nothing is withheld meanwhile)."""
    value = cdp_settings.CONSENT
    if value is None:
        return None
    parsed = _cache.get("consent")
    if parsed is None:
        parsed = _cache["consent"] = parse(value, registry.identity)
    return None if parsed.problem else parsed


def trigger_blocker() -> str | None:
    """Why the triggers cannot decide consent (a Python function), or None."""
    consent = current()
    if consent is not None and consent.function is not None:
        return f"{KEY} = {cdp_settings.CONSENT!r} is a Python function"
    return None


# --- Python -------------------------------------------------------------------------------------


def _grants(consent: Consent, owner: models.Model) -> bool:
    if consent.function is None:  # a field path: decided in the query, never here
        return False
    try:
        return consent.function(owner) is True
    except Exception:
        logger.exception("django-cdp: %s raised for %r; its messages are withheld", KEY, owner)
        return False


def allowed_pks(pks: Iterable[Any], using: str) -> set[Any]:
    """The identity pks among ``pks`` whose owners' messages may be written (one query).

    An owner row that does not exist is not withheld: its messages fail as they would
    without ``CONSENT`` (no owner, no userId).
    """
    pks = list(pks)
    consent = current()
    if consent is None or not pks:
        return set(pks)
    queryset = registry.configured_identity.model._base_manager.using(using).filter(pk__in=pks)
    refused: set[Any]
    if consent.source is not None:
        refused = set(queryset.exclude(**{consent.source.path: True}).values_list("pk", flat=True))
    else:
        refused = {owner.pk for owner in queryset if not _grants(consent, owner)}
    return set(pks) - refused


def allows(owner_pk: Any, using: str) -> bool:
    """Whether the messages of the owner with this pk may be written."""
    return current() is None or owner_pk in allowed_pks([owner_pk], using)


def allows_owner(owner: models.Model) -> bool:
    """:func:`allows` for an identity instance in hand (the browser snippet)."""
    consent = current()
    if consent is None:
        return True
    if consent.function is not None:
        return _grants(consent, owner)
    return allows(owner.pk, owner._state.db or "default")


def withhold(event: str, using: str) -> None:
    """Count one track ``event`` not written for want of consent (in the caller's transaction:
    a rolled-back change counts nothing)."""
    WithheldCount.objects.using(using).create(
        hour=count_hour(timezone.now()), event=event[:200], n=1
    )


# --- SQL (the trigger engine) -------------------------------------------------------------------


def sql_grants(builder: Builder, identity: IdentityConfig, row: str) -> str:
    """SQL: the identity row ``row`` (a jsonb) has consent. TRUE when ``CONSENT`` is unset."""
    consent = current()
    if consent is None or consent.source is None:
        return "TRUE"
    value = builder.source_value(identity.model, consent.source, row).sql
    return f"COALESCE(({value}) = 'true'::jsonb, FALSE)"


def sql_allows(builder: Builder, config: ModelConfig, identity: IdentityConfig, row: str) -> str:
    """SQL: the owner of ``row`` (a jsonb of a ``config.model`` row) lets its messages be
    written: it has consent, or there is no such owner row (as :func:`allowed_pks`)."""
    if current() is None:
        return "TRUE"
    if config.is_identity:
        return sql_grants(builder, identity, row)
    owner_pk, _ = builder.owner(config, identity, row)
    pk = identity.model._meta.pk
    pk_type = pk.cast_db_type(builder.connection)
    return (
        f"NOT EXISTS (SELECT 1 FROM {builder.table(identity.model)} o "
        f"WHERE o.{builder.quote(column(pk))} = ({owner_pk})::{pk_type} "
        f"AND NOT {sql_grants(builder, identity, 'to_jsonb(o)')})"
    )


def sql_consenting(builder: Builder, config: ModelConfig, rows: str) -> str:
    """``rows`` (a FROM item with a jsonb column ``j``) without those of owners lacking
    consent: ``rows`` itself when ``CONSENT`` is unset."""
    if current() is None:
        return rows
    allows_ = sql_allows(builder, config, registry.configured_identity, "q.j")
    return f"(SELECT * FROM {rows} q WHERE {allows_})"


def sql_withhold(builder: Builder, config: ModelConfig, event: str, rows: str, table: str) -> str:
    """A statement counting, as ``event``, the rows of ``rows`` (a FROM item with a jsonb
    column ``j``) whose owner lacks consent; ``""`` when ``CONSENT`` is unset."""
    if current() is None or not event:
        return ""
    allows_ = sql_allows(builder, config, registry.configured_identity, "q.j")
    literal = "'" + event[:200].replace("'", "''") + "'"
    return (
        f"    INSERT INTO {table} (hour, event, n) SELECT date_trunc('hour', clock_timestamp()), "
        f"{literal}, count(*) FROM {rows} q WHERE NOT {allows_} HAVING count(*) > 0;\n"
    )


# --- checks -------------------------------------------------------------------------------------


def check_consent(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E015: ``CONSENT`` does not name a boolean field of the identity model or a function."""
    value = cdp_settings.CONSENT
    if value is None or not isinstance(value, str):
        return []  # E001 reports a value of the wrong type
    problem = parse(value, registry.identity).problem
    if not problem:
        return []
    return [
        checks.Error(
            problem,
            hint="Give a BooleanField of the identity model (a path through foreign keys "
            "works: 'settings__analytics_opt_in'), or the dotted path of a function that "
            f"takes the owner and returns True or False. See {DOC}.",
            id="django_cdp.E015",
        )
    ]


@receiver(setting_changed)
def _forget_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        _cache.clear()
