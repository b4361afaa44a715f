"""The event dictionary: every event and trait django-cdp can send, with types and meaning.

A tracking strategy starts from a dictionary of which events exist, what
triggers them and what each property means. django-cdp already knows all of
that: the registry says which models emit which events with which properties,
the model fields give each property's JSON type, nullability and help_text,
and ``DJANGO_CDP["EVENTS"]`` declares the events sent by hand with
``django_cdp.track()``. This module builds the dictionary from those, once per
registry load, and renders it as Markdown (for people) and as JSON Schema
draft-07 (for ``manage.py cdp_dictionary --check`` in CI, for importing into a
tracking-plan tool, and for :mod:`django_cdp.validation`).

The per-event schema has the shape Segment Protocols and RudderStack tracking
plans use: a schema of the whole message whose ``properties`` (or, for the
identify, ``traits``) member is constrained, so violation paths read
``/properties/amount`` as they do there.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from django.core import checks
from django.db import models

from django_cdp.fields import foreign_key
from django_cdp.registry import ACTIONS, UPDATED, Source, registry
from django_cdp.settings import SETTING_NAME, cdp_settings

DRAFT_07 = "http://json-schema.org/draft-07/schema#"
MANUAL = "manual"
LOGIN = "login"
SIGNED_IN = "Signed In"

#: JSON types a manual event's property may declare (``"any"`` means no constraint).
JSON_TYPES = frozenset({"string", "integer", "number", "boolean", "object", "array", "null", "any"})
EVENT_KEYS = frozenset({"description", "properties", "additional_properties"})
PROPERTY_KEYS = frozenset({"type", "format", "required", "description", "nullable", "enum"})
VALIDATION_MODES = ("flag", "raise", "block", "off")


@dataclass(frozen=True)
class PropertySpec:
    """One property of an event, or one trait of the identify."""

    name: str
    #: The JSON Schema of the value (``{}`` when anything goes).
    schema: dict[str, Any]
    required: bool = True
    description: str = ""
    #: Where the value comes from (a field path, attribute, or ``""`` for manual events).
    source: str = ""

    @property
    def type_label(self) -> str:
        """A short human form of the schema's type: ``string (date-time) | null``."""
        types = self.schema.get("type")
        if types is None:
            return "any"
        if isinstance(types, str):
            types = [types]
        label = " | ".join(types)
        item_type = self.schema.get("items", {}).get("type")
        if types == ["array"] and isinstance(item_type, str):
            label = f"array of {item_type}"
        if "format" in self.schema:
            first, *rest = types
            label = " | ".join([f"{first} ({self.schema['format']})", *rest])
        return label

    @property
    def nullable(self) -> bool:
        types = self.schema.get("type")
        return types is None or types == "null" or (isinstance(types, list) and "null" in types)


@dataclass(frozen=True)
class EventSpec:
    """One track event of the plan."""

    name: str
    #: ``created``, ``updated``, ``deleted``, ``manual`` or ``login``.
    trigger: str
    #: ``app_label.Model`` of the model that emits it, or ``""`` for a manual event.
    source_model: str
    properties: tuple[PropertySpec, ...]
    description: str = ""
    additional_properties: bool = False

    def schema(self) -> dict[str, Any]:
        """The event's JSON Schema (draft-07), over the whole message."""
        return _message_schema(
            self.name,
            self.description or _default_description(self),
            "properties",
            self.properties,
            self.additional_properties,
            {"trigger": self.trigger, "source_model": self.source_model},
        )


@dataclass(frozen=True)
class Dictionary:
    """The whole plan: the identify's traits and every track event by name."""

    identity_model: str
    user_id: str
    traits: tuple[PropertySpec, ...]
    events: dict[str, EventSpec] = field(default_factory=dict)

    def identify_schema(self) -> dict[str, Any]:
        return _message_schema(
            "Identify",
            f"Identify of a {self.identity_model} (userId: {self.user_id})."
            if self.identity_model
            else "Identify.",
            "traits",
            self.traits,
            False,
            {"source_model": self.identity_model},
        )

    def to_json_schema(self) -> dict[str, Any]:
        """``{"identify": <schema>, "events": {<name>: <schema>}}``, events sorted by name."""
        return {
            "identify": self.identify_schema(),
            "events": {name: self.events[name].schema() for name in sorted(self.events)},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_schema(), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        return _markdown(self)


# --- building ------------------------------------------------------------------------------------

_cache: tuple[Any, Dictionary] | None = None


def get_dictionary() -> Dictionary:
    """The dictionary of the current configuration, built once per registry load."""
    global _cache
    # The registry re-parses when DJANGO_CDP changes; its parsed state is the cache key, so
    # EVENTS, LOGIN and the models can never be out of step with what the writer uses.
    parsed = registry._get()
    if _cache is None or _cache[0] is not parsed:
        _cache = (parsed, build())
    return _cache[1]


def build() -> Dictionary:
    """Build the dictionary from the registry, the model fields and ``EVENTS``."""
    identity = registry.identity
    traits: tuple[PropertySpec, ...] = ()
    identity_label = user_id = ""
    if identity is not None:
        identity_label = identity.model._meta.label
        user_id = identity.user_id_field.name
        traits = tuple(_source_spec(identity.model, s) for s in identity.traits)
    events: dict[str, EventSpec] = {}
    for config in registry:
        for action in ACTIONS:
            if action not in config.events:
                continue
            props = [
                PropertySpec(
                    "id",
                    _field_schema(config.model._meta.pk),
                    description="Primary key of the object.",
                    source=config.model._meta.pk.name,
                ),
                *(_source_spec(config.model, s) for s in config.properties),
            ]
            if action == UPDATED:
                props.append(
                    PropertySpec(
                        "changed_fields",
                        {"type": "array", "items": {"type": "string"}},
                        description="Names of the properties whose values changed.",
                    )
                )
            name = config.event_name(action)
            events[name] = EventSpec(name, action, config.label, tuple(props))
    manual, _ = parse_events(cdp_settings.EVENTS)
    for spec in manual:
        events.setdefault(spec.name, spec)
    login = cdp_settings.LOGIN
    if isinstance(login, dict) and login.get("track_sign_in") and SIGNED_IN not in events:
        events[SIGNED_IN] = EventSpec(
            SIGNED_IN,
            LOGIN,
            identity_label,
            (),
            description="A user of this customer logged in (DJANGO_CDP['LOGIN']).",
        )
    return Dictionary(identity_label, user_id, traits, events)


def _source_spec(model: type[models.Model], source: Source) -> PropertySpec:
    if source.kind == "attribute":
        attr = getattr(model, source.path, None)
        doc = (getattr(attr, "__doc__", None) or "").strip().splitlines()
        return PropertySpec(source.name, {}, description=doc[0] if doc else "", source=source.path)
    schema = _field_schema(source.model_field)
    if source.kind == "path" and "null" not in _types(schema) and _path_nullable(model, source):
        schema = _with_null(schema)
    return PropertySpec(
        source.name, schema, description=str(source.model_field.help_text or ""), source=source.path
    )


def _path_nullable(model: type[models.Model], source: Source) -> bool:
    """A path is None when any foreign key along it is null."""
    current = model
    for part in source.path.split("__")[:-1]:
        f = foreign_key(current, part)
        if f.null:
            return True
        current = f.related_model
    return False


def _base_schema(f: models.Field) -> dict[str, Any]:
    """The JSON Schema of a non-null value of ``f``, as ``payloads.json_value`` writes it."""
    if isinstance(f, models.ForeignKey):
        return _base_schema(f.target_field)
    # Subclasses before their bases: DateTimeField is a DateField.
    if isinstance(f, models.DateTimeField):
        return {"type": "string", "format": "date-time"}
    if isinstance(f, models.DateField):
        return {"type": "string", "format": "date"}
    if isinstance(f, models.TimeField):
        return {"type": "string", "format": "time"}
    if isinstance(f, models.UUIDField):
        return {"type": "string", "format": "uuid"}
    if isinstance(f, models.BooleanField):
        return {"type": "boolean"}
    if isinstance(f, models.IntegerField | models.AutoField):
        return {"type": "integer"}
    if isinstance(f, models.DecimalField | models.FloatField | models.DurationField):
        return {"type": "number"}
    if isinstance(f, models.JSONField):
        return {}
    if isinstance(f, models.CharField | models.TextField | models.GenericIPAddressField):
        return {"type": "string"}
    # A custom field: its internal type says how the database (and so the value) sees it.
    internal = f.get_internal_type()
    if "Integer" in internal or internal.endswith("AutoField"):
        return {"type": "integer"}
    if internal in ("CharField", "TextField", "SlugField", "EmailField", "URLField"):
        return {"type": "string"}
    return {}


def _field_schema(f: models.Field) -> dict[str, Any]:
    schema = _base_schema(f)
    return _with_null(schema) if f.null else schema


def _types(schema: dict[str, Any]) -> list[str]:
    types = schema.get("type")
    if types is None:
        return []
    return [types] if isinstance(types, str) else list(types)


def _with_null(schema: dict[str, Any]) -> dict[str, Any]:
    if "type" not in schema:
        return schema  # already anything
    return {**schema, "type": [*_types(schema), "null"]}


def _property_schema(spec: PropertySpec) -> dict[str, Any]:
    schema = copy.deepcopy(spec.schema)
    if spec.description:
        schema["description"] = spec.description
    return schema


def _default_description(event: EventSpec) -> str:
    if event.trigger in ACTIONS:
        return f"A {event.source_model} was {event.trigger}."
    return ""


def _message_schema(
    title: str,
    description: str,
    member: str,
    specs: tuple[PropertySpec, ...],
    additional: bool,
    meta: dict[str, str],
) -> dict[str, Any]:
    inner: dict[str, Any] = {
        "type": "object",
        "properties": {s.name: _property_schema(s) for s in specs},
        "required": [s.name for s in specs if s.required],
    }
    if not additional:
        inner["additionalProperties"] = False
    return {
        "$schema": DRAFT_07,
        "title": title,
        "description": description,
        "x-django-cdp": {k: v for k, v in meta.items() if v},
        "type": "object",
        "properties": {member: inner},
        "required": [member],
    }


# --- manual events -------------------------------------------------------------------------------


def parse_events(raw: Any) -> tuple[list[EventSpec], list[checks.CheckMessage]]:
    """Parse ``DJANGO_CDP["EVENTS"]``; broken entries are left out and reported (E009)."""
    specs: list[EventSpec] = []
    problems: list[checks.CheckMessage] = []
    if not isinstance(raw, dict):
        return specs, problems  # the wrong type is E001
    model_events = {
        config.event_name(a) for config in registry for a in ACTIONS if a in config.events
    }
    for name, options in raw.items():
        key = f"{SETTING_NAME}['EVENTS'][{name!r}]"

        def error(msg: str, hint: str, key: str = key) -> None:
            problems.append(checks.Error(f"{key}{msg}", hint=hint, id="django_cdp.E009"))

        if not isinstance(name, str) or not name.strip():
            error(" has an empty or non-string event name.", "Name events like 'Customer Charged'.")
            continue
        if name in model_events:
            error(
                " has the name of an automatic event.",
                "Automatic events are described by their model; rename the manual event.",
            )
            continue
        if not isinstance(options, dict):
            error(" must be a dict.", "Use {'description': '...', 'properties': {...}}.")
            continue
        unknown = sorted(set(options) - EVENT_KEYS, key=str)
        if unknown:
            error(
                f"[{unknown[0]!r}] is not an event option.",
                "Known keys: " + ", ".join(sorted(EVENT_KEYS)) + ".",
            )
            continue
        description = options.get("description", "")
        additional = options.get("additional_properties", False)
        raw_props = options.get("properties", {})
        if not isinstance(description, str) or not isinstance(additional, bool):
            error(
                " has a non-string 'description' or a non-boolean 'additional_properties'.",
                "'description' is text; 'additional_properties' is True or False.",
            )
            continue
        if not isinstance(raw_props, dict):
            error("['properties'] must be a dict.", "Map property name -> {'type': ...}.")
            continue
        props = []
        for prop, spec in raw_props.items():
            parsed = _parse_property(prop, spec)
            if isinstance(parsed, str):
                error(
                    f"['properties'][{prop!r}] {parsed}",
                    "Use {'type': 'string'|'integer'|'number'|'boolean'|'object'|'array'|'any', "
                    "'required': True|False, 'description': '...'} (optional: 'format', "
                    "'nullable', 'enum').",
                )
                break
            props.append(parsed)
        else:
            specs.append(EventSpec(name, MANUAL, "", tuple(props), description, additional))
    return specs, problems


def _parse_property(name: Any, spec: Any) -> PropertySpec | str:
    """A manual event's property, or the reason it is wrong."""
    if not isinstance(name, str) or not name:
        return "has an empty or non-string name."
    if not isinstance(spec, dict):
        return "must be a dict."
    unknown = sorted(set(spec) - PROPERTY_KEYS, key=str)
    if unknown:
        return f"has an unknown key {unknown[0]!r}."
    types = spec.get("type", "any")
    type_list = [types] if isinstance(types, str) else types
    if not isinstance(type_list, list | tuple) or not type_list:
        return f"has type {types!r}: not a JSON type or a list of them."
    if any(not isinstance(t, str) or t not in JSON_TYPES for t in type_list):
        return f"has type {types!r}: not a JSON type or a list of them."
    kinds = (("required", bool), ("nullable", bool), ("description", str), ("format", str))
    for key, kind in kinds:
        if key in spec and not isinstance(spec[key], kind):
            return f"has {key!r} = {spec[key]!r}, which is not a {kind.__name__}."
    if "enum" in spec and not isinstance(spec["enum"], list | tuple):
        return "has an 'enum' that is not a list."
    schema: dict[str, Any] = {}
    if "any" not in type_list:
        clean = list(dict.fromkeys(type_list))
        if spec.get("nullable") and "null" not in clean:
            clean.append("null")
        schema["type"] = clean[0] if len(clean) == 1 else clean
    if "format" in spec:
        schema["format"] = spec["format"]
    if "enum" in spec:
        schema["enum"] = list(spec["enum"])
    return PropertySpec(
        name, schema, required=spec.get("required", False), description=spec.get("description", "")
    )


def check_plan(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """System check E009: a broken ``EVENTS`` entry or an unknown ``VALIDATION`` mode."""
    _, problems = parse_events(cdp_settings.EVENTS)
    mode = cdp_settings.VALIDATION
    if isinstance(mode, str) and mode not in VALIDATION_MODES:
        problems.append(
            checks.Error(
                f"{SETTING_NAME}['VALIDATION'] = {mode!r} is not a validation mode.",
                hint="Use 'flag' (store, send and record violations), 'raise' (in tests), "
                "'block' (store but never send) or 'off'.",
                id="django_cdp.E009",
            )
        )
    return problems


# --- Markdown ------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(specs: tuple[PropertySpec, ...], first: str) -> list[str]:
    if not specs:
        return ["No properties.", ""]
    lines = [
        f"| {first} | type | nullable | required | source | description |",
        "|---|---|---|---|---|---|",
    ]
    for s in specs:
        source = f"`{s.source}`" if s.source else ""
        lines.append(
            f"| `{_cell(s.name)}` | {_cell(s.type_label)} | {'yes' if s.nullable else 'no'} "
            f"| {'yes' if s.required else 'no'} | {source} | {_cell(s.description)} |"
        )
    lines.append("")
    return lines


def _markdown(d: Dictionary) -> str:
    lines = [
        "# Event dictionary",
        "",
        "Generated by `manage.py cdp_dictionary` from `DJANGO_CDP` and the model fields.",
        "",
        "## Identify",
        "",
    ]
    if d.identity_model:
        lines += [f"Identified model: `{d.identity_model}`; userId: `{d.user_id}`.", ""]
    lines += _table(d.traits, "trait")
    lines += ["## Events", "", "| event | trigger | source model |", "|---|---|---|"]
    for name in sorted(d.events):
        e = d.events[name]
        source = f"`{e.source_model}`" if e.source_model else ""
        lines.append(f"| {_cell(name)} | {e.trigger} | {source} |")
    lines.append("")
    for name in sorted(d.events):
        e = d.events[name]
        lines += [f"### {name}", ""]
        meta = f"Trigger: {e.trigger}"
        if e.source_model:
            meta += f" · source model: `{e.source_model}`"
        if e.additional_properties:
            meta += " · other properties allowed"
        lines += [meta + ".", ""]
        if e.description:
            lines += [_cell(e.description), ""]
        lines += _table(e.properties, "property")
    return "\n".join(lines).rstrip("\n") + "\n"
