"""Which models django-cdp tracks, and how, parsed once from ``DJANGO_CDP``.

The registry turns the settings dict into typed, resolved configuration:
models instead of labels, field objects instead of strings, event names
computed. Parsing never raises: every problem becomes a system-check message
that names the exact key (``django_cdp.checks`` reports them), and the broken
entry is left out, so a bad dict cannot crash ``ready()`` and ``manage.py
check`` can always run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.core import checks
from django.core.exceptions import FieldDoesNotExist
from django.core.signals import setting_changed
from django.db import models
from django.dispatch import receiver
from django.utils import translation
from django.utils.functional import cached_property

from django_cdp.settings import DEFAULTS, SETTING_NAME, cdp_settings

CREATED, UPDATED, DELETED = "created", "updated", "deleted"
ACTIONS = (CREATED, UPDATED, DELETED)

MODEL_KEYS = frozenset({"owner", "events", "properties", "event_names", "integrations", "identify"})
IDENTITY_KEYS = frozenset({"model", "user_id", "traits"})

_TYPES: dict[str, tuple[type, ...]] = {
    "ENABLED": (bool,),
    "WRITE_KEY": (str,),
    "DATA_PLANE_URL": (str,),
    "IDENTITY": (dict,),
    "MODELS": (dict,),
    "SEND_UNCHANGED_IDENTIFY": (bool,),
    "MAX_MESSAGE_BYTES": (int,),
    "ENRICH_MESSAGE": (str, type(None)),
    "DELIVERY": (str,),
    "SEND": (bool,),
    "QUEUE": (str, type(None)),
    "MAX_BATCH_BYTES": (int,),
    "MAX_BATCH_MESSAGES": (int,),
    "MAX_ATTEMPTS": (int,),
    "GZIP": (bool,),
    "CONNECT_TIMEOUT": (int, float),
    "READ_TIMEOUT": (int, float),
    "LEASE_SECONDS": (int, float),
    "DELIVERY_TIME_BUDGET": (int, float),
    "KICK_DEBOUNCE_SECONDS": (int, float),
    "RETRY_BACKOFF_BASE": (int, float),
    "RETRY_BACKOFF_MAX": (int, float),
    "CONFIG_ERROR_RETRY_SECONDS": (int, float),
    "RETENTION_DAYS": (int,),
    "EVENTS": (dict,),
    "VALIDATION": (str,),
    "LOGIN": (dict,),
    "FRONTEND": (dict,),
}


@dataclass(frozen=True)
class Source:
    """Where one property or trait value comes from.

    ``column`` is a concrete field of the model itself (its value is in memory
    and its changes are detected); ``path`` follows foreign keys (``plan__name``);
    ``attribute`` is a property or a no-argument method.
    """

    name: str
    path: str
    kind: str  # "column" | "path" | "attribute"
    field: models.Field | None = None

    @property
    def attname(self) -> str | None:
        return self.field.attname if self.field is not None else None


@dataclass(frozen=True)
class IdentityConfig:
    """The identified customer model, the field giving its userId, and its traits."""

    model: type[models.Model]
    user_id_field: models.Field
    traits: tuple[Source, ...]

    @property
    def user_id_is_pk(self) -> bool:
        return self.user_id_field.primary_key

    @property
    def trait_paths(self) -> tuple[str, ...]:
        """Trait sources that a single ``values()`` query can read."""
        return tuple(s.path for s in self.traits if s.kind != "attribute")

    @property
    def needs_instance(self) -> bool:
        return any(s.kind == "attribute" for s in self.traits)


@dataclass(frozen=True)
class ModelConfig:
    """How one registered model is tracked."""

    model: type[models.Model]
    label: str
    owner_path: str | None  # None for the identity model itself
    events: frozenset[str]
    properties: tuple[Source, ...]
    event_names: dict[str, str]
    integrations: dict[str, Any] | None
    identify: bool
    is_identity: bool = False
    #: Whether a change of this model can change the owner's traits: it is the identity
    #: model, a trait path runs through it, or a trait is computed (property/method).
    can_change_traits: bool = True
    # attname -> names of the properties it feeds; the columns whose changes make an Updated.
    tracked_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    column_fields: dict[str, models.Field] = field(default_factory=dict)

    @property
    def owner_attname(self) -> str | None:
        """The local FK column holding the owner's pk, when the owner is one hop away."""
        if self.owner_path is None or "__" in self.owner_path:
            return None
        return self.model._meta.get_field(self.owner_path).attname

    def event_name(self, action: str) -> str:
        return self.event_names[action]


class Registry:
    """The parsed ``DJANGO_CDP`` configuration, rebuilt when the setting changes."""

    def __init__(self) -> None:
        self._parsed: _Parsed | None = None

    def _get(self) -> _Parsed:
        if self._parsed is None:
            self._parsed = parse(cdp_settings.raw)
        return self._parsed

    def reload(self) -> None:
        self._parsed = None

    @property
    def identity(self) -> IdentityConfig | None:
        return self._get().identity

    @property
    def problems(self) -> list[checks.CheckMessage]:
        return list(self._get().problems)

    def get(self, model: type[models.Model]) -> ModelConfig | None:
        """The config of a registered model (or of the identity model's implicit entry)."""
        return self._get().models.get(model)

    def __iter__(self) -> Iterator[ModelConfig]:
        return iter(self._get().models.values())

    def is_registered(self, model: type[models.Model]) -> bool:
        return model in self._get().models


registry = Registry()


@receiver(setting_changed)
def _reload_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        registry.reload()


# --- parsing -----------------------------------------------------------------------------------


@dataclass
class _Parsed:
    identity: IdentityConfig | None = None
    models: dict[type[models.Model], ModelConfig] = field(default_factory=dict)
    problems: list[checks.CheckMessage] = field(default_factory=list)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int subclass: True is not a valid MAX_ATTEMPTS.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _error(id_: str, msg: str, hint: str) -> checks.Error:
    return checks.Error(msg, hint=hint, id=f"django_cdp.{id_}")


def parse(config: Any) -> _Parsed:
    """Parse a ``DJANGO_CDP`` dict into a registry, collecting problems instead of raising."""
    out = _Parsed()
    if not isinstance(config, dict):
        out.problems.append(
            _error(
                "E001",
                f"{SETTING_NAME} must be a dict, not {type(config).__name__}.",
                f"Set {SETTING_NAME} = {{...}} in your settings module.",
            )
        )
        return out
    for key, value in config.items():
        if key not in DEFAULTS:
            out.problems.append(
                _error(
                    "E001",
                    f"{SETTING_NAME}[{key!r}] is not a django-cdp setting.",
                    "Known keys: " + ", ".join(sorted(DEFAULTS)) + ".",
                )
            )
        elif not _type_ok(value, _TYPES[key]):
            expected = " or ".join(t.__name__ for t in _TYPES[key])
            out.problems.append(
                _error(
                    "E001",
                    f"{SETTING_NAME}[{key!r}] must be {expected}, not {type(value).__name__}.",
                    f"Default: {DEFAULTS[key]!r}.",
                )
            )
    if config.get("DELIVERY", "celery") not in ("celery", "manual"):
        out.problems.append(
            _error(
                "E001",
                f"{SETTING_NAME}['DELIVERY'] must be 'celery' or 'manual', "
                f"not {config['DELIVERY']!r}.",
                "'celery' kicks a worker after each commit; 'manual' leaves delivery to "
                "`manage.py cdp_deliver`.",
            )
        )

    out.identity = _parse_identity(config.get("IDENTITY"), out.problems)
    raw_models = config.get("MODELS", {})
    if isinstance(raw_models, dict):
        for label, options in raw_models.items():
            parsed = _parse_model(label, options, out.identity, out.problems)
            if parsed is not None:
                out.models[parsed.model] = parsed
    identity = out.identity
    if identity is not None and identity.model not in out.models:
        # Not listed in MODELS: no track events, but its traits are still identified on save.
        out.models[identity.model] = ModelConfig(
            model=identity.model,
            label=identity.model._meta.label,
            owner_path=None,
            events=frozenset(),
            properties=(),
            event_names={},
            integrations=None,
            identify=True,
            is_identity=True,
        )
    return out


def _resolve_model(label: Any) -> type[models.Model] | None:
    if not isinstance(label, str) or label.count(".") != 1:
        return None
    try:
        return apps.get_model(label)
    except LookupError:
        return None


def _parse_identity(raw: Any, problems: list) -> IdentityConfig | None:
    key = f"{SETTING_NAME}['IDENTITY']"
    if raw is None:
        problems.append(
            _error(
                "E002",
                f"{key} is missing: django-cdp needs to know which model is the identified "
                "customer.",
                "Add 'IDENTITY': {'model': 'app_label.Model', 'traits': {...}}.",
            )
        )
        return None
    if not isinstance(raw, dict):
        return None  # reported as E001 (wrong type)
    for unknown in sorted(set(raw) - IDENTITY_KEYS, key=str):
        problems.append(
            _error(
                "E002",
                f"{key}[{unknown!r}] is not an identity option.",
                "Known keys: model, user_id, traits.",
            )
        )
    model = _resolve_model(raw.get("model"))
    if model is None:
        problems.append(
            _error(
                "E002",
                f"{key}['model'] = {raw.get('model')!r} is not an installed model.",
                "Use 'app_label.ModelName' of a model in INSTALLED_APPS.",
            )
        )
        return None
    user_id_name = raw.get("user_id", model._meta.pk.name)
    try:
        user_id_field = model._meta.get_field(user_id_name)
        if not user_id_field.concrete:
            raise FieldDoesNotExist
    except (FieldDoesNotExist, TypeError):
        problems.append(
            _error(
                "E002",
                f"{key}['user_id'] = {user_id_name!r} is not a field of {model._meta.label}.",
                "Name a concrete field whose value, as a string, is the userId "
                "(default: the primary key).",
            )
        )
        return None
    traits = _parse_sources(
        model, raw.get("traits", {}), f"{key}['traits']", "E004", problems, allow_list=False
    )
    return IdentityConfig(model=model, user_id_field=user_id_field, traits=traits)


def _parse_model(
    label: Any, options: Any, identity: IdentityConfig | None, problems: list
) -> ModelConfig | None:
    key = f"{SETTING_NAME}['MODELS'][{label!r}]"
    model = _resolve_model(label)
    if model is None:
        problems.append(
            _error(
                "E003",
                f"{key}: {label!r} is not an installed model.",
                "Use 'app_label.ModelName' of a model in INSTALLED_APPS.",
            )
        )
        return None
    if not isinstance(options, dict):
        problems.append(
            _error("E008", f"{key} must be a dict of options.", "Use {} for the defaults.")
        )
        return None
    ok = True
    for unknown in sorted(set(options) - MODEL_KEYS, key=str):
        problems.append(
            _error(
                "E008",
                f"{key}[{unknown!r}] is not a model option.",
                "Known keys: " + ", ".join(sorted(MODEL_KEYS)) + ".",
            )
        )
        ok = False

    events = options.get("events", list(ACTIONS))
    if not isinstance(events, list | tuple) or any(e not in ACTIONS for e in events):
        problems.append(
            _error(
                "E007",
                f"{key}['events'] = {events!r} has an unknown event kind.",
                "Use a list of 'created', 'updated' and 'deleted'.",
            )
        )
        ok = False
        events = []
    event_names_raw = options.get("event_names", {})
    if not isinstance(event_names_raw, dict) or any(
        k not in ACTIONS or not isinstance(v, str) or not v for k, v in event_names_raw.items()
    ):
        problems.append(
            _error(
                "E007",
                f"{key}['event_names'] = {event_names_raw!r} has an unknown event kind "
                "or a name that is not a non-empty string.",
                "Map 'created', 'updated' or 'deleted' to an event name, e.g. "
                "{'created': 'Payout Sent'}.",
            )
        )
        ok = False
        event_names_raw = {}

    is_identity = identity is not None and model is identity.model
    owner_path = options.get("owner")
    if is_identity:
        if owner_path is not None:
            problems.append(
                _error(
                    "E006",
                    f"{key}['owner'] must not be set: {model._meta.label} is the identity model.",
                    "Remove 'owner'; the identity model owns itself.",
                )
            )
            ok = False
        owner_path = None
    elif identity is not None and not fk_path_reaches(
        model, owner_path, identity.model, reverse_one_to_one=False
    ):
        problems.append(
            _error(
                "E006",
                f"{key}['owner'] = {owner_path!r} is missing or does not lead to the "
                f"identity model {identity.model._meta.label}.",
                "Give the foreign-key path from this model to the identity model, "
                "e.g. 'shop' or 'order__shop'.",
            )
        )
        ok = False

    integrations = options.get("integrations")
    if integrations is not None and not isinstance(integrations, dict):
        problems.append(
            _error(
                "E008",
                f"{key}['integrations'] must be a dict such as {{'All': True, 'Intercom': False}}.",
                "See the Segment/RudderStack 'integrations' object.",
            )
        )
        ok = False
    identify = options.get("identify", True)
    if not isinstance(identify, bool):
        problems.append(
            _error("E008", f"{key}['identify'] must be True or False.", "Default: True.")
        )
        ok = False

    properties = _parse_sources(
        model, options.get("properties", []), f"{key}['properties']", "E005", problems
    )
    if not ok or identity is None:
        return None

    base = default_event_base(model)
    event_names = {a: event_names_raw.get(a, f"{base} {a.capitalize()}") for a in ACTIONS}
    tracked: dict[str, list[str]] = {}
    column_fields: dict[str, models.Field] = {}
    for source in properties:
        if source.kind == "attribute":
            continue  # computed: sent with its current value, not compared
        # A path's change is detected on its local FK column (where the path leads).
        local = (
            source.field
            if source.kind == "column"
            else model._meta.get_field(source.path.split("__", 1)[0])
        )
        tracked.setdefault(local.attname, []).append(source.name)
        column_fields[local.attname] = local
    return ModelConfig(
        model=model,
        label=model._meta.label,
        owner_path=owner_path,
        events=frozenset(events),
        properties=properties,
        event_names=event_names,
        integrations=integrations,
        identify=identify,
        is_identity=is_identity,
        can_change_traits=is_identity or _can_change_traits(model, identity),
        tracked_columns={k: tuple(v) for k, v in tracked.items()},
        column_fields=column_fields,
    )


def _can_change_traits(model: type[models.Model], identity: IdentityConfig) -> bool:
    if identity.needs_instance:
        return True  # a property or method may compute from anything
    for source in identity.traits:
        current = identity.model
        for part in source.path.split("__")[:-1]:
            current = current._meta.get_field(part).related_model
            if current is model:
                return True
    return False


def default_event_base(model: type[models.Model]) -> str:
    """The untranslated verbose_name with every word capitalised ("Workspace Project")."""
    with translation.override(None):
        name = str(model._meta.verbose_name)
    return " ".join(word[:1].upper() + word[1:] for word in name.split())


def fk_path_reaches(
    model: type[models.Model], path: Any, target: type[models.Model], *, reverse_one_to_one: bool
) -> bool:
    """Whether ``path`` ("order__shop") leads from ``model`` to ``target`` through to-one relations.

    Owner paths must use forward foreign keys (the owner is resolved from the
    row's own columns); a login path may also cross a reverse one-to-one
    ("profile__shop" from the user).
    """
    if not isinstance(path, str) or not path:
        return False
    current = model
    for part in path.split("__"):
        try:
            f = current._meta.get_field(part)
        except FieldDoesNotExist:
            return False
        if not (f.is_relation and (f.many_to_one or f.one_to_one)):
            return False
        if not f.concrete and not reverse_one_to_one:
            return False
        current = f.related_model
    return current is target


def _parse_sources(
    model: type[models.Model],
    raw: Any,
    key: str,
    error_id: str,
    problems: list,
    allow_list: bool = True,
) -> tuple[Source, ...]:
    """Parse a property or trait mapping (``{name: path}``, or a list of names)."""
    if allow_list and isinstance(raw, list | tuple):
        raw = {name: name for name in raw}
    if not isinstance(raw, dict):
        expected = (
            "a dict of name -> field path, or a list of field names"
            if allow_list
            else ("a dict of trait name -> field path")
        )
        problems.append(_error(error_id, f"{key} must be {expected}.", f"Got {raw!r}."))
        return ()
    sources = []
    for name, path in raw.items():
        source = _resolve_source(model, name, path)
        if source is None:
            problems.append(
                _error(
                    error_id,
                    f"{key}[{name!r}] = {path!r} does not resolve on {model._meta.label}.",
                    "Use a field name, a path through foreign keys such as 'plan__name', "
                    "or the name of a property or no-argument method.",
                )
            )
        else:
            sources.append(source)
    return tuple(sources)


def _resolve_source(model: type[models.Model], name: Any, path: Any) -> Source | None:
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        return None
    # A dunder name such as "__str__" is an attribute, not a path.
    parts = [path] if path.startswith("__") and path.endswith("__") else path.split("__")
    if len(parts) == 1:
        try:
            f = model._meta.get_field(path)
        except FieldDoesNotExist:
            attr = getattr(model, path, None)
            if isinstance(attr, property | cached_property) or (
                callable(attr) and not isinstance(attr, type)
            ):
                return Source(name=name, path=path, kind="attribute")
            return None
        if not f.concrete or f.many_to_many:
            return None
        return Source(name=name, path=path, kind="column", field=f)
    current = model
    for i, part in enumerate(parts):
        try:
            f = current._meta.get_field(part)
        except FieldDoesNotExist:
            return None
        last = i == len(parts) - 1
        if last:
            if not f.concrete or f.many_to_many:
                return None
            return Source(name=name, path=path, kind="path", field=f)
        if not (f.is_relation and (f.many_to_one or f.one_to_one) and f.concrete):
            return None
        current = f.related_model
    return None
