"""Which engine captures a model's changes: database triggers or Django signals.

``CAPTURE = "auto"`` (the default) uses triggers on PostgreSQL for every model
whose mapping the database can compute: properties and traits that are fields
or foreign-key paths, of field types the triggers render exactly as the signal
engine does. Everything else (SQLite, MySQL, a property or trait computed by a
Python method, a field type without a rendering) is captured with signals. A
model's ``capture`` key overrides ``CAPTURE``; asking for ``"triggers"`` where
they cannot compute the mapping is check ``E013``.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core.signals import setting_changed
from django.db import connections, models, router
from django.dispatch import receiver

from django_cdp import consent
from django_cdp.registry import IdentityConfig, ModelConfig, Source, registry
from django_cdp.settings import SETTING_NAME, cdp_settings

SIGNALS, TRIGGERS = "signals", "triggers"

#: Field types the triggers render (``get_internal_type()``), and how the JSON looks is
#: the same as the signal engine's (docs/tracking.md, "Values").
TRIGGER_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "SmallAutoField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
        "BooleanField",
        "CharField",
        "TextField",
        "SlugField",
        "EmailField",
        "URLField",
        "GenericIPAddressField",
        "DecimalField",
        "FloatField",
        "DateField",
        "DateTimeField",
        "UUIDField",
        "JSONField",
    }
)


@dataclass(frozen=True)
class Choice:
    """The engine of one model on one database, and why."""

    engine: str
    reason: str


def value_field(field: models.Field) -> models.Field:
    """The field whose values a column holds (a foreign key holds its target's)."""
    while isinstance(field, models.ForeignKey):
        field = field.target_field
    return field


def field_blocker(field: models.Field | None, where: str) -> str | None:
    """Why the triggers cannot render this field's values, or None."""
    if field is None:
        return f"{where} is computed by Python"
    kind = value_field(field).get_internal_type()
    if kind not in TRIGGER_TYPES:
        return f"{where} is a {kind}, which the triggers do not render"
    if kind == "DateTimeField" and not settings.USE_TZ:
        return f"{where} is a DateTimeField without USE_TZ (naive times)"
    return None


def _sources_blocker(sources: tuple[Source, ...], what: str) -> str | None:
    for source in sources:
        if source.kind == "attribute":
            return f"{what} {source.name!r} is computed by Python ({source.path})"
        blocker = field_blocker(source.field, f"{what} {source.name!r}")
        if blocker:
            return blocker
    return None


def identity_blocker(identity: IdentityConfig) -> str | None:
    """Why the database cannot compute the identity's traits and userId, or None."""
    return (
        _sources_blocker(identity.traits, "trait")
        or field_blocker(identity.user_id_field, "the user_id field")
        or field_blocker(
            identity.model._meta.pk, f"the primary key of {identity.model._meta.label}"
        )
    )


def trigger_blocker(config: ModelConfig) -> str | None:
    """Why triggers cannot capture this model (whatever the database), or None."""
    blocker = (
        consent.trigger_blocker()
        or _sources_blocker(config.properties, "property")
        or field_blocker(config.model._meta.pk, "the primary key")
    )
    if blocker:
        return blocker
    if config.identify or config.is_identity:
        identity = registry.identity
        blocker = identity_blocker(identity) if identity is not None else "no IDENTITY"
        if blocker:
            return f"its owner's identify: {blocker}"
    return None


def requested(config: ModelConfig) -> str:
    """``auto``, ``signals`` or ``triggers``: the model's ``capture`` key or ``CAPTURE``."""
    return config.capture or cdp_settings.CAPTURE


def choose(config: ModelConfig, vendor: str) -> Choice:
    """The engine that captures ``config``'s model on a database of ``vendor``."""
    mode = requested(config)
    key = "capture" if config.capture else "CAPTURE"
    if mode == SIGNALS:
        return Choice(SIGNALS, f"{key} = 'signals'")
    if vendor != "postgresql":
        return Choice(SIGNALS, f"triggers need PostgreSQL, this database is {vendor}")
    blocker = trigger_blocker(config)
    if blocker:
        return Choice(SIGNALS, blocker)
    return Choice(TRIGGERS, f"{key} = {mode!r} on PostgreSQL")


def database_of(model: type[models.Model]) -> str:
    return router.db_for_write(model)


_cache: dict[tuple[type[models.Model], str], str] = {}


def engine_for(model: type[models.Model], using: str) -> str:
    """The engine capturing writes of ``model`` on ``using`` (cached until settings change).

    A ``"triggers"`` request that the triggers cannot serve (check ``E013``) is
    captured with signals, so nothing is lost while the check is ignored.
    """
    key = (model, using)
    engine = _cache.get(key)
    if engine is None:
        config = registry.get(model)
        vendor = connections[using].vendor
        engine = SIGNALS if config is None else choose(config, vendor).engine
        _cache[key] = engine
    return engine


def trigger_configs(using: str) -> list[ModelConfig]:
    """The registered models captured by triggers on ``using``."""
    return [c for c in registry if engine_for(c.model, using) == TRIGGERS]


@receiver(setting_changed)
def _forget_on_change(*, setting: str, **kwargs) -> None:
    if setting in (SETTING_NAME, "DATABASES", "DATABASE_ROUTERS", "USE_TZ"):
        _cache.clear()
