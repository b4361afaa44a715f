"""Tracking-plan validation of every message when it is written to the outbox.

A tracking plan is only worth something if what is sent follows it. Every
message is checked against the event dictionary (:mod:`django_cdp.dictionary`)
with ``jsonschema`` in the outbox writer, before its row is built, and the
``VALIDATION`` setting says what a violation does:

``flag`` (default)
    Store and send; record the violations on the row (``Message.violations``,
    filterable in the admin) and log a warning. Nothing is lost while a plan is
    being tightened.
``raise``
    Raise :class:`TrackingPlanViolation` where the message is emitted, nothing
    stored. For a project's own test suite: a typo in an event name or a
    property of the wrong type fails the test that emits it.
``block``
    Store the message as ``blocked`` with its violations: never sent, never
    silently dropped (Segment Protocols' blocked events are gone for good;
    here they stay inspectable and can be requeued once the plan is fixed).
``off``
    No validation at all.

Violations use RudderStack's names (``Unplanned-Event``, ``Required-Missing``,
``Datatype-Mismatch``, ``Additional-Properties``, and ``Unknown-Violation``
for the rest) and its shape (``type``, ``message``, ``meta.instancePath``,
``meta.schemaPath``), plus ``property``, so tools that read one read the other.

Validators are compiled once per registry load (when ``DJANGO_CDP`` changes),
never per message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from jsonschema import Draft7Validator

from django_cdp.dictionary import get_dictionary
from django_cdp.registry import registry
from django_cdp.settings import cdp_settings

logger = logging.getLogger("django_cdp")

UNPLANNED_EVENT = "Unplanned-Event"
REQUIRED_MISSING = "Required-Missing"
DATATYPE_MISMATCH = "Datatype-Mismatch"
ADDITIONAL_PROPERTIES = "Additional-Properties"
UNKNOWN_VIOLATION = "Unknown-Violation"

_BY_KEYWORD = {
    "required": REQUIRED_MISSING,
    "type": DATATYPE_MISMATCH,
    "format": DATATYPE_MISMATCH,
    "additionalProperties": ADDITIONAL_PROPERTIES,
}


class TrackingPlanViolation(Exception):
    """A message does not follow the tracking plan (``VALIDATION = "raise"``)."""

    def __init__(self, message: dict[str, Any], violations: list[dict[str, Any]]) -> None:
        self.message = message
        self.violations = violations
        name = message.get("event") or message.get("type", "message")
        details = "; ".join(f"{v['type']}: {v['message']}" for v in violations)
        super().__init__(f"{name!r} violates the tracking plan: {details}")


@dataclass(frozen=True)
class Verdict:
    """The outcome of validating one message, for the writer to act on."""

    violations: list[dict[str, Any]] = field(default_factory=list)
    #: True when the message must be stored as ``blocked`` (``VALIDATION = "block"``).
    blocked: bool = False

    @property
    def summary(self) -> str:
        """One line for ``Message.last_error`` of a blocked message."""
        return "blocked by the tracking plan: " + "; ".join(
            f"{v['type']}: {v['message']}" for v in self.violations
        )


CONFORMS = Verdict()


# --- compiled validators -------------------------------------------------------------------------

_JSON_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float | Decimal) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
# Keywords the quick check understands; a property with any other keyword goes to jsonschema.
_QUICK_KEYWORDS = frozenset({"type", "description", "title"})


class _QuickCheck:
    """A fast "certainly conforms" test compiled from a member's schema.

    Almost every message conforms, and jsonschema's full walk costs tens of
    microseconds per message on the save path. This answers True only when the
    message surely conforms (required keys present, no unplanned keys in a closed
    schema, plain types right); anything it is unsure of goes to jsonschema, which
    stays the judge of what a violation is.
    """

    #: How many shapes (keys and value types) of one member's values have their verdict kept.
    SHAPES = 256

    def __init__(self, schema: dict[str, Any]) -> None:
        self.verdicts: dict[tuple[tuple[str, ...], tuple[type, ...]], bool] = {}
        self.required = frozenset(schema.get("required", ()))
        self.closed = schema.get("additionalProperties", True) is False
        self.checks = {
            name: _quick_value_check(prop) for name, prop in schema.get("properties", {}).items()
        }
        self.usable = set(schema) <= {
            "type",
            "properties",
            "required",
            "additionalProperties",
            "description",
            "title",
        }

    def conforms(self, value: Any) -> bool:
        """Whether ``value`` surely conforms.

        The verdict depends only on the keys and on the types of the values when no value
        is a list (whose items are checked too), and the messages of one event nearly
        always share keys and types: it is computed once per such shape.
        """
        if not self.usable or not isinstance(value, dict):
            return False
        types = tuple(map(type, value.values()))
        shape = (tuple(value), types)
        verdict = self.verdicts.get(shape)
        if verdict is None:
            verdict = self._conforms(value)
            if len(self.verdicts) < self.SHAPES and all(t in _FLAT for t in types):
                self.verdicts[shape] = verdict
        return verdict

    def _conforms(self, value: dict[str, Any]) -> bool:
        if not self.required <= value.keys():
            return False
        for name, item in value.items():
            checks = self.checks.get(name, _UNPLANNED)
            if checks is _UNPLANNED:
                if self.closed:
                    return False
            elif checks is None or not checks(item):
                return False
        return True


def _quick_types(prop: Any) -> list[Any] | None:
    """Type tests for a property schema made of ``type`` (and prose) only, else None."""
    if not isinstance(prop, dict) or not set(prop) <= _QUICK_KEYWORDS:
        return None
    types = prop.get("type")
    types = [types] if isinstance(types, str) else types or []
    if any(t not in _JSON_TYPES for t in types):
        return None
    return [_JSON_TYPES[t] for t in types]


def _quick_value_check(prop: Any) -> Any:
    """A test ``value -> bool`` for one property, or None when only jsonschema can tell."""
    items = prop.get("items") if isinstance(prop, dict) else None
    outer = _quick_types({k: v for k, v in prop.items() if k != "items"} if items else prop)
    if outer is None:
        return None
    inner = _quick_types(items) if items is not None else []
    if inner is None:
        return None

    def check(value: Any) -> bool:
        if outer and not any(test(value) for test in outer):
            return False
        if inner and isinstance(value, list):
            return all(any(test(item) for test in inner) for item in value)
        return True

    return check


_UNPLANNED = object()
#: Value types whose quick check depends on the type alone (a list's depends on its items).
_FLAT = frozenset({str, int, float, Decimal, bool, type(None), dict})


@dataclass
class _Member:
    validator: Draft7Validator
    quick: _QuickCheck


@dataclass
class _Compiled:
    identify: _Member
    events: dict[str, _Member]


_cache: tuple[Any, _Compiled] | None = None


def _compile(schema: dict[str, Any], member: str) -> _Member:
    # Only the constrained member is validated (the envelope is django-cdp's own); paths are
    # prefixed with the member again when violations are reported.
    member_schema = schema["properties"][member]
    return _Member(
        Draft7Validator(member_schema, format_checker=Draft7Validator.FORMAT_CHECKER),
        _QuickCheck(member_schema),
    )


def _compiled() -> _Compiled:
    global _cache
    parsed = registry._get()  # re-parsed whenever DJANGO_CDP changes: the cache key
    if _cache is None or _cache[0] is not parsed:
        d = get_dictionary()
        _cache = (
            parsed,
            _Compiled(
                identify=_compile(d.identify_schema(), "traits"),
                events={name: _compile(e.schema(), "properties") for name, e in d.events.items()},
            ),
        )
    return _cache[1]


# --- checking ------------------------------------------------------------------------------------


def _violation(kind: str, prop: str, text: str, instance_path: str, schema_path: str) -> dict:
    return {
        "type": kind,
        "property": prop,
        "message": text,
        "meta": {"instancePath": instance_path, "schemaPath": schema_path},
    }


def _errors(compiled: _Member, member: str, value: Any) -> list[dict[str, Any]]:
    if compiled.quick.conforms(value):
        return []
    validator = compiled.validator
    if not isinstance(value, dict):
        return [
            _violation(DATATYPE_MISMATCH, "", f"{member} must be an object", f"/{member}", "#/type")
        ]
    out = []
    for error in validator.iter_errors(value):
        path = "/" + "/".join([member, *(str(p) for p in error.absolute_path)])
        schema_path = "#/properties/" + "/".join(
            [member, *(str(p) for p in error.absolute_schema_path)]
        )
        kind = _BY_KEYWORD.get(error.validator, UNKNOWN_VIOLATION)
        if kind == REQUIRED_MISSING:
            missing = [p for p in error.validator_value if p not in error.instance]
            for prop in missing:
                out.append(
                    _violation(kind, prop, f"{prop!r} is a required property", path, schema_path)
                )
        elif kind == ADDITIONAL_PROPERTIES:
            known = error.schema.get("properties", {})
            for prop in [p for p in error.instance if p not in known]:
                out.append(
                    _violation(
                        kind,
                        prop,
                        f"{prop!r} is not in the tracking plan",
                        f"{path}/{prop}",
                        schema_path,
                    )
                )
        else:
            prop = str(error.absolute_path[0]) if error.absolute_path else ""
            out.append(_violation(kind, prop, error.message, path, schema_path))
    # jsonschema reports a missing property once per "required" error, and one error may name
    # several: keep one violation per (type, path, property).
    unique = {(v["type"], v["meta"]["instancePath"], v["property"]): v for v in out}
    return list(unique.values())


def _member_of(message: dict[str, Any]) -> tuple[_Member | None, str, Any]:
    """The compiled plan of the message's constrained member (None: an unplanned event),
    the member's name and its value."""
    compiled = _compiled()
    if message.get("type") == "identify":
        return compiled.identify, "traits", message.get("traits")
    return compiled.events.get(message.get("event", "")), "properties", message.get("properties")


def surely_conforms(message: dict[str, Any]) -> bool:
    """Whether the message certainly follows the plan, by the quick check alone.

    False means "not sure": :func:`violations_of` is the judge. For messages that
    are nearly always fine and must be checked in bulk (trigger-written messages
    at their claim), where the full check is needed only for the rest.
    """
    member, _, value = _member_of(message)
    return member is not None and member.quick.conforms(value)


def violations_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The tracking-plan violations of one message (empty when it conforms).

    Public so that code writing messages outside the outbox writer (a backfill's
    ``bulk_create``) can validate them the same way.
    """
    validator, member, value = _member_of(message)
    if validator is None:
        event = message.get("event", "")
        return [
            _violation(
                UNPLANNED_EVENT,
                "",
                f"event {event!r} is not in the tracking plan",
                "/event",
                "#",
            )
        ]
    return _errors(validator, member, value)


def validate(message: dict[str, Any]) -> Verdict:
    """Validate a message as the outbox writer is about to store it, per ``VALIDATION``.

    Returns :data:`CONFORMS` when it follows the plan (or validation is off);
    raises :class:`TrackingPlanViolation` in ``raise`` mode; otherwise logs a
    warning and returns the violations, ``blocked`` in ``block`` mode.
    """
    mode = cdp_settings.VALIDATION
    if mode == "off":
        return CONFORMS
    violations = violations_of(message)
    if not violations:
        return CONFORMS
    if mode == "raise":
        raise TrackingPlanViolation(message, violations)
    blocked = mode == "block"
    logger.warning(
        "django-cdp: %s message %s (%s) violates the tracking plan%s: %s",
        message.get("type"),
        message.get("messageId"),
        message.get("event") or message.get("userId"),
        " and is blocked" if blocked else "",
        "; ".join(f"{v['type']}: {v['message']}" for v in violations),
    )
    return Verdict(violations, blocked)
