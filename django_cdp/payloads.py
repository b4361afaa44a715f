"""How a model change becomes a Segment/RudderStack message.

Everything that decides what leaves the database is here: reading the mapped
fields (an allowlist, nothing else of the row), converting their values to
JSON the same way everywhere, building ``track`` and ``identify`` messages in
the shape both HTTP APIs accept, and encoding them once, exactly as they will
be sent.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import json
import math
import re
import secrets
import time
import uuid
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone
from django.utils.functional import Promise

from django_cdp import __version__, scope
from django_cdp.registry import ModelConfig, Source
from django_cdp.settings import cdp_settings

LIBRARY_NAME = "django-cdp"


class PayloadError(ValueError):
    """A value that cannot be sent as JSON, named by the property or trait it came from.

    Its text is the reason a failed outbox row carries, e.g.
    ``score: nan is not a JSON number``.
    """

    def __init__(self, field: str, value: Any, reason: str = "") -> None:
        self.field = field
        self.value = value
        detail = reason or f"{type(value).__name__} is not JSON-serialisable"
        super().__init__(f"{field}: {detail}")


# --- values ------------------------------------------------------------------------------------


def iso_timestamp(value: datetime.datetime) -> str:
    """ISO-8601 in UTC with a ``Z`` suffix; naive values are taken in the current time zone."""
    if timezone.is_naive(value):
        value = timezone.make_aware(value)
    return value.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def json_value(value: Any, field: str) -> Any:
    """Convert one value to its JSON form, or raise :class:`PayloadError` naming ``field``.

    Decimals stay ``Decimal`` (JSON-safe here: :func:`encode` writes them as
    exact JSON numbers, never through float); enums and choices become their
    value; model instances their pk; datetimes ISO-8601 in UTC; dates
    ``YYYY-MM-DD``; UUIDs strings; durations seconds. Anything else is an error,
    never a silent drop.
    """
    if value is None or type(value) in (str, int, bool):
        return value
    if isinstance(value, enum.Enum):
        return json_value(value.value, field)
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(field, value, f"{value} is not a JSON number")
        return value
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise PayloadError(field, value, f"{value} is not a JSON number")
        return value
    if isinstance(value, datetime.datetime):
        return iso_timestamp(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Promise):
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, models.Model):
        return json_value(value.pk, field)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise PayloadError(field, value, f"key {key!r} is not a string")
            out[str(key)] = json_value(item, field)
        return out
    if isinstance(value, list | tuple):
        return [json_value(item, field) for item in value]
    if isinstance(value, set | frozenset):
        items = [json_value(item, field) for item in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    raise PayloadError(field, value)


def field_value(field: models.Field | None, value: Any, name: str) -> Any:
    """The JSON form of ``value`` as the database holds it in ``field``.

    The value goes through the field first, as it does on its way into the
    database: ``to_python`` (an int assigned to a ``CharField`` is the string
    the row holds) and, for a ``DecimalField``, its ``decimal_places``
    (``Decimal("49.9")`` is stored, reloaded and sent as ``49.90``). A value
    the field refuses is a :class:`PayloadError` naming ``name``.
    """
    if field is not None and value is not None:
        try:
            value = field.to_python(value)
        except ValidationError as exc:
            raise PayloadError(name, value, "; ".join(exc.messages)) from exc
        if isinstance(field, models.DecimalField) and isinstance(value, decimal.Decimal):
            value = _quantize(value, field)
    return json_value(value, name)


def _quantize(value: decimal.Decimal, field: models.DecimalField) -> decimal.Decimal:
    if not value.is_finite() or field.decimal_places is None:
        return value
    context = decimal.Context(prec=max(field.max_digits or 28, 28))
    try:
        return value.quantize(decimal.Decimal(1).scaleb(-field.decimal_places), context=context)
    except decimal.InvalidOperation:
        return value  # too many digits: the database refuses the save itself


def read_source(instance: models.Model, source: Source) -> Any:
    """The raw value of a property or trait on an instance (FK columns give the id)."""
    if source.kind == "column":
        return getattr(instance, source.model_field.attname)
    if source.kind == "attribute":
        value = getattr(instance, source.path)
        return value() if callable(value) else value
    current: Any = instance
    for part in source.path.split("__"):
        if current is None:
            return None
        current = getattr(current, part)
    if isinstance(current, models.Model):
        return current.pk
    return current


def joined_for(queryset: models.QuerySet, sources: tuple[Source, ...]) -> models.QuerySet:
    """``queryset`` joined along the foreign keys the sources' paths follow, so that
    :func:`read_sources` reads them without a query per row."""
    related = sorted({s.path.rsplit("__", 1)[0] for s in sources if s.kind == "path"})
    return queryset.select_related(*related) if related else queryset


def read_sources(
    instance: models.Model,
    sources: tuple[Source, ...],
    stored: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON values of ``sources`` on ``instance``.

    ``stored`` maps attnames to the values the database holds where they differ
    from the instance's (the columns a ``save(update_fields=...)`` left out).
    A source that raises (a property, a method) is a :class:`PayloadError`
    naming it.
    """
    values = {}
    for source in sources:
        if stored and source.kind == "column" and source.attname in stored:
            raw = stored[source.attname]
        else:
            try:
                raw = read_source(instance, source)
            except Exception as exc:
                raise PayloadError(
                    source.name, None, f"{source.path} raised {type(exc).__name__}: {exc}"
                ) from exc
        values[source.name] = field_value(source.field, raw, source.name)
    return values


def values_of(row: dict[str, Any], sources: tuple[Source, ...]) -> dict[str, Any]:
    """The JSON values of ``sources`` from a ``values()`` row keyed by their paths."""
    return {s.name: field_value(s.field, row[s.path], s.name) for s in sources}


def properties_of(
    instance: models.Model, config: ModelConfig, stored: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The mapped properties of an object, plus its primary key as ``id``."""
    props = {"id": json_value(instance.pk, "id")}
    props.update(read_sources(instance, config.properties, stored))
    return props


# --- messages ----------------------------------------------------------------------------------


def _base(
    kind: str, user_id: str | None, when: datetime.datetime | None, message_id: str | None
) -> dict[str, Any]:
    """The fields every message has; with the current :func:`django_cdp.context` (and the
    request's ``anonymousId``), whose fields never replace ``library``."""
    ambient = scope.current()
    message = {
        "type": kind,
        "userId": user_id,
        "messageId": message_id or new_message_id(),
        "originalTimestamp": iso_timestamp(when or timezone.now()),
        "channel": "server",
        "context": {
            **ambient.context,
            "library": {"name": LIBRARY_NAME, "version": __version__},
        },
    }
    if ambient.anonymous_id is not None:
        message["anonymousId"] = ambient.anonymous_id
    return message


def new_message_id() -> str:
    """A new ``messageId``: a time-ordered UUID (version 7, RFC 9562).

    Random ids (version 4) land on a random leaf of the outbox's unique ``message_id``
    index, so after each checkpoint nearly every write logs a full index page; ids that
    grow with time land on the rightmost leaf. The trigger engine writes the same form
    (:data:`django_cdp.capture.sql.NEW_MESSAGE_ID`). Data planes take any unique string.
    """
    millis = time.time_ns() // 1_000_000
    value = (millis & 0xFFFF_FFFF_FFFF) << 80 | secrets.randbits(80)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return str(uuid.UUID(int=value))


def track_message(
    event: str,
    user_id: str | None,
    properties: dict[str, Any],
    *,
    integrations: dict[str, Any] | None = None,
    when: datetime.datetime | None = None,
    message_id: str | None = None,
) -> dict[str, Any]:
    message = _base("track", user_id, when, message_id)
    message["event"] = event
    message["properties"] = properties
    message["integrations"] = integrations or {"All": True}
    return message


def identify_message(
    user_id: str | None,
    traits: dict[str, Any],
    *,
    integrations: dict[str, Any] | None = None,
    when: datetime.datetime | None = None,
    message_id: str | None = None,
) -> dict[str, Any]:
    """An identify with traits at the top level (Segment spec) and in ``context.traits``
    (where RudderStack's own SDK puts them), so destinations of either read them."""
    message = _base("identify", user_id, when, message_id)
    message["traits"] = traits
    message["context"]["traits"] = traits
    message["integrations"] = integrations or {"All": True}
    return message


def enrich(message: dict[str, Any], instance: models.Model | None) -> dict[str, Any]:
    """Run the project's ``ENRICH_MESSAGE`` hook, which may add context or integrations."""
    hook = cdp_settings.ENRICH_MESSAGE  # imported by cdp_settings; None when unset
    if hook is None:
        return message
    result = hook(message, instance)
    if result is None:
        return message
    if not isinstance(result, dict):
        raise TypeError(f"ENRICH_MESSAGE hook {hook!r} returned {type(result).__name__}, not dict")
    return result


# --- encoding ----------------------------------------------------------------------------------

# Decimals are written as exact JSON numbers: the encoder emits a marked string that is then
# unquoted. The per-process nonce makes a collision with real data practically impossible.
_DECIMAL_MARK = "\x00cdp-decimal-" + secrets.token_hex(8) + ":"
_DECIMAL_RE = re.compile('"' + re.escape(json.dumps(_DECIMAL_MARK)[1:-1]) + r'([-+0-9.Ee]+)"')
_DECIMAL_MARK_ESCAPED = json.dumps(_DECIMAL_MARK)[1:-1]


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return _DECIMAL_MARK + str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode(message: dict[str, Any], *, sort_keys: bool = False) -> str:
    """Compact JSON text of a message, exactly as it is stored and sent.

    Raises ``ValueError`` for a non-finite float (say, one an ``ENRICH_MESSAGE``
    hook added) and ``TypeError`` for a value JSON has no form for.
    """
    text = json.dumps(
        message,
        separators=(",", ":"),
        ensure_ascii=False,
        default=_default,
        sort_keys=sort_keys,
        allow_nan=False,  # NaN and Infinity are not JSON: no data plane parses them
    )
    if _DECIMAL_MARK_ESCAPED in text:
        text = _DECIMAL_RE.sub(r"\1", text)
    return text


def traits_digest(traits: dict[str, Any]) -> str:
    """A stable digest of a traits dict, to tell whether an identify would change anything."""
    return hashlib.sha256(encode(traits, sort_keys=True).encode()).hexdigest()
