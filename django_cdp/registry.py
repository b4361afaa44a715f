"""Which models django-cdp tracks, and how, parsed once from ``DJANGO_CDP``.

The registry turns the settings dict into typed, resolved configuration:
models instead of labels, field objects instead of strings, event names
computed. Parsing never raises: every problem becomes a system-check message
that names the exact key (``django_cdp.checks`` reports them), and the broken
entry is left out, so a bad dict cannot crash ``ready()`` and ``manage.py
check`` can always run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.core import checks
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import models
from django.dispatch import receiver
from django.utils import translation
from django.utils.functional import cached_property

from django_cdp.fields import foreign_key
from django_cdp.settings import (
    IMPORT_STRINGS,
    SETTING_NAME,
    SETTINGS,
    cdp_settings,
    import_setting,
)

CREATED, UPDATED, DELETED = "created", "updated", "deleted"
ACTIONS = (CREATED, UPDATED, DELETED)

MODEL_KEYS = frozenset(
    {"owner", "events", "properties", "event_names", "integrations", "identify", "capture"}
)
#: The values of ``CAPTURE`` and of a model's ``capture`` key.
CAPTURE_MODES = ("auto", "signals", "triggers")
IDENTITY_KEYS = frozenset({"model", "user_id", "traits"})

#: Check hints end with a page of django-cdp's repository (the docs are not installed
#: with the package): "See django-cdp/docs/tracking.md#configuration-errors."
DOCS_BASE = "django-cdp/"
SETTINGS_DOC = "README.md#the-django_cdp-settings-dict"
CHECKS_DOC = "docs/tracking.md#configuration-errors"


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

    @property
    def model_field(self) -> models.Field:
        """The field of a ``column`` or ``path`` source (an ``attribute`` has none)."""
        if self.field is None:
            raise TypeError(f"{self.path!r} is an attribute, not a field")
        return self.field


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
    #: The model's ``capture`` key (None: the top-level ``CAPTURE``).
    capture: str | None = None
    is_identity: bool = False
    # attname -> names of the properties it feeds; the columns whose changes make an Updated.
    tracked_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    column_fields: dict[str, models.Field] = field(default_factory=dict)

    @property
    def owner_attname(self) -> str | None:
        """The local FK column holding the owner's pk, when the owner is one hop away."""
        if self.owner_path is None or "__" in self.owner_path:
            return None
        return foreign_key(self.model, self.owner_path).attname

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
    def configured_identity(self) -> IdentityConfig:
        """The identity, for code that runs only for a registered model.

        A model is captured only under a parsed ``IDENTITY``; should that ever not
        hold, this names the setting instead of failing on ``None`` further down.
        """
        identity = self._get().identity
        if identity is None:
            raise ImproperlyConfigured(
                f"{SETTING_NAME}['IDENTITY'] is missing or broken: see `manage.py check` "
                "(django_cdp.E002)."
            )
        return identity

    @property
    def problems(self) -> list[checks.CheckMessage]:
        return list(self._get().problems)

    def get(self, model: type[models.Model]) -> ModelConfig | None:
        """The config of a registered model (or of the identity model's implicit entry)."""
        return self._get().models.get(model)

    def config(self, model: type[models.Model]) -> ModelConfig:
        """The config of a model the caller knows to be registered."""
        config = self.get(model)
        if config is None:
            raise TypeError(f"{model._meta.label} is not registered in {SETTING_NAME}")
        return config

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


def _check_setting(key: Any, value: Any) -> list[checks.CheckMessage]:
    """E001 for one top-level key: unknown, of a type :data:`SETTINGS` does not allow,
    or a dotted path that does not import (found now, not at the first save)."""
    setting = SETTINGS.get(key)
    if setting is None:
        return [
            _error(
                "E001",
                f"{SETTING_NAME}[{key!r}] is not a django-cdp setting."
                + did_you_mean(key, SETTINGS),
                "Known keys: " + ", ".join(sorted(SETTINGS)) + ".",
                SETTINGS_DOC,
            )
        ]
    if not _type_ok(value, setting.types):
        expected = " or ".join(t.__name__ for t in setting.types)
        return [
            _error(
                "E001",
                f"{SETTING_NAME}[{key!r}] must be {expected}, not {type(value).__name__}.",
                f"{setting.doc} Default: {setting.default!r}.",
                SETTINGS_DOC,
            )
        ]
    if key in IMPORT_STRINGS and value:
        try:
            import_setting(key, value)
        except ImportError as exc:
            return [
                _error(
                    "E001",
                    str(exc),
                    f"{setting.doc} Give the dotted path of a function in an importable module.",
                    SETTINGS_DOC,
                )
            ]
    return []


def _error(id_: str, msg: str, hint: str, page: str = CHECKS_DOC) -> checks.Error:
    return checks.Error(msg, hint=f"{hint} See {DOCS_BASE}{page}.", id=f"django_cdp.{id_}")


def did_you_mean(value: Any, candidates: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest candidate, or ``""``.

    Compared case-insensitively (``apps.get_model`` ignores the case of model
    names). The value itself is never suggested: a hint that repeats what failed
    sends the reader looking for a typo that is not there.
    """
    if not isinstance(value, str):
        return ""
    by_lower = {c.lower(): c for c in candidates if c != value}
    close = difflib.get_close_matches(value.lower(), by_lower, n=1, cutoff=0.6)
    return f" Did you mean {by_lower[close[0]]!r}?" if close else ""


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
        out.problems.extend(_check_setting(key, value))
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

    capture = config.get("CAPTURE", "auto")
    if isinstance(capture, str) and capture not in CAPTURE_MODES:
        out.problems.append(
            _error(
                "E001",
                f"{SETTING_NAME}['CAPTURE'] must be 'auto', 'signals' or 'triggers', "
                f"not {capture!r}." + did_you_mean(capture, CAPTURE_MODES),
                "'auto' captures with database triggers on PostgreSQL where it can, with "
                "signals elsewhere.",
            )
        )

    defer = config.get("DEFER_STATEMENT_ROWS")
    if isinstance(defer, int) and not isinstance(defer, bool) and defer < 1:
        out.problems.append(
            _error(
                "E001",
                f"{SETTING_NAME}['DEFER_STATEMENT_ROWS'] must be at least 1 (or None), "
                f"not {defer!r}.",
                "None writes every message in the statement of its change; a number defers "
                "statements of at least that many rows to delivery.",
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


def _model_labels() -> list[str]:
    return [model._meta.label for model in apps.get_models()]


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
                f"{key}[{unknown!r}] is not an identity option."
                + did_you_mean(unknown, IDENTITY_KEYS),
                "Known keys: model, user_id, traits.",
            )
        )
    model = _resolve_model(raw.get("model"))
    if model is None:
        problems.append(
            _error(
                "E002",
                f"{key}['model'] = {raw.get('model')!r} is not an installed model."
                + did_you_mean(raw.get("model"), _model_labels()),
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
                f"{key}['user_id'] = {user_id_name!r} is not a field of {model._meta.label}."
                + did_you_mean(user_id_name, (f.name for f in model._meta.concrete_fields)),
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
                f"{key}: {label!r} is not an installed model."
                + did_you_mean(label, _model_labels()),
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
                f"{key}[{unknown!r}] is not a model option." + did_you_mean(unknown, MODEL_KEYS),
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
    elif identity is not None and (
        why := fk_path_problem(model, owner_path, identity.model, reverse_one_to_one=False)
    ):
        target = identity.model._meta.label
        direct = [
            f.name
            for f in model._meta.concrete_fields
            if f.is_relation and f.related_model is identity.model and f.name != owner_path
        ]
        problems.append(
            _error(
                "E006",
                f"{key}['owner'] is missing: {model._meta.label} is not the identity model."
                if owner_path is None
                else f"{key}['owner'] = {owner_path!r} does not lead to the identity model "
                f"{target}: {why}.",
                f"Give the path of foreign keys from {model._meta.label} to {target}"
                + (f", here {direct[0]!r}." if direct else ", e.g. 'order__shop'."),
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
    capture = options.get("capture")
    if capture is not None and capture not in CAPTURE_MODES:
        problems.append(
            _error(
                "E008",
                f"{key}['capture'] = {capture!r} is not a capture engine."
                + did_you_mean(capture, CAPTURE_MODES),
                "Use 'auto', 'signals' or 'triggers' (default: the top-level CAPTURE).",
            )
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
            source.model_field
            if source.kind == "column"
            else foreign_key(model, source.path.split("__", 1)[0])
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
        capture=capture,
        is_identity=is_identity,
        tracked_columns={k: tuple(v) for k, v in tracked.items()},
        column_fields=column_fields,
    )


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
    return fk_path_problem(model, path, target, reverse_one_to_one=reverse_one_to_one) is None


def fk_path_problem(
    model: type[models.Model], path: Any, target: type[models.Model], *, reverse_one_to_one: bool
) -> str | None:
    """Why ``path`` does not lead from ``model`` to ``target`` (see :func:`fk_path_reaches`),
    or ``None`` when it does."""
    if not isinstance(path, str) or not path:
        return "it must be a non-empty string"
    current = model
    for part in path.split("__"):
        reached, why = _hop(current, part, reverse_one_to_one=reverse_one_to_one)
        if reached is None:
            return why
        current = reached
    if current is not target:
        return f"it leads to {current._meta.label}"
    return None


def _field(model: type[models.Model], name: str, *, or_attribute: bool = False) -> tuple[Any, str]:
    """``(field, "")``, or ``(None, why)`` naming the model and the closest of its fields
    (and of its properties and methods, where those are allowed). The candidates are
    only listed on failure: parsing a good configuration pays nothing for them."""
    try:
        return model._meta.get_field(name), ""
    except FieldDoesNotExist:
        known = [f.name for f in model._meta.get_fields()]
        if or_attribute:
            known += _attribute_names(model)
        return None, f"{name!r} is not a field of {model._meta.label}.{did_you_mean(name, known)}"


def _describe(f: Any) -> str:
    """'a CharField', 'an IntegerField', 'a ManyToManyField' (the field's class, for a reason)."""
    kind = type(f).__name__
    return f"{'an' if kind[0] in 'AEIU' else 'a'} {kind}"


def _hop(
    model: type[models.Model], part: str, *, reverse_one_to_one: bool = False
) -> tuple[type[models.Model] | None, str]:
    """Follow one step of a path: the related model, or ``None`` and why not.

    A step must be a to-one relation (many-to-one or one-to-one) so that the
    path names a single row; reverse one-to-ones only where the caller allows.
    """
    f, why = _field(model, part)
    if f is None:
        return None, why
    if not (f.is_relation and (f.many_to_one or f.one_to_one)):
        return None, f"{part!r} is {_describe(f)} of {model._meta.label}, not a foreign key"
    if not f.concrete and not reverse_one_to_one:
        return None, f"{part!r} is a reverse relation of {model._meta.label}, not a foreign key"
    return f.related_model, ""


def _parse_sources(
    model: type[models.Model],
    raw: Any,
    key: str,
    error_id: str,
    problems: list,
    allow_list: bool = True,
) -> tuple[Source, ...]:
    """Parse a property or trait mapping (``{name: path}``, or a list of names).

    A problem names the entry as the user wrote it: ``['properties']['x']`` in a
    dict, ``['properties'][1]`` in a list, so the key in the message can be found.
    """
    if allow_list and isinstance(raw, list | tuple):
        entries = [(f"[{i}]", name, name) for i, name in enumerate(raw)]
    elif isinstance(raw, dict):
        entries = [(f"[{name!r}]", name, path) for name, path in raw.items()]
    else:
        expected = (
            "a dict of name -> field path, or a list of field names"
            if allow_list
            else ("a dict of trait name -> field path")
        )
        problems.append(_error(error_id, f"{key} must be {expected}.", f"Got {raw!r}."))
        return ()
    sources = []
    for index, name, path in entries:
        source = _resolve_source(model, name, path)
        if isinstance(source, str):
            problems.append(
                _error(
                    error_id,
                    f"{key}{index} = {path!r} does not resolve: {source}",
                    "Use a field name, a path through foreign keys (fk__field), "
                    "or the name of a property or no-argument method.",
                )
            )
        else:
            sources.append(source)
    return tuple(sources)


def _is_attribute(value: Any) -> bool:
    """Whether a class attribute is a property or a method (a source computed per instance)."""
    return isinstance(value, property | cached_property) or (
        callable(value) and not isinstance(value, type)
    )


def _attribute_names(model: type[models.Model]) -> list[str]:
    """The model's own properties and methods (not Django's), as suggestions for a typo."""
    inherited = set(dir(models.Model))
    return [
        name
        for name in dir(model)
        if not name.startswith("_")
        and name not in inherited
        and _is_attribute(getattr(model, name, None))
    ]


def _resolve_source(model: type[models.Model], name: Any, path: Any) -> Source | str:
    """The :class:`Source` of a property or trait, or why it does not resolve.

    The reason names the failing part and the model it was looked up on
    ("'title' is a CharField of app.Book, not a foreign key"), since a path such
    as ``plan__name`` can fail at either step.
    """
    if not isinstance(name, str) or not name:
        return f"the name {name!r} is not a non-empty string."
    if not isinstance(path, str) or not path:
        return "the source is not a non-empty string."
    # A dunder name such as "__str__" is an attribute, not a path.
    *hops, last = [path] if path.startswith("__") and path.endswith("__") else path.split("__")
    current = model
    for part in hops:
        reached, why = _hop(current, part)
        if reached is None:
            return f"{why}."
        current = reached
    if hops:
        f, why = _field(current, last)
    else:
        f, why = _field(model, last, or_attribute=True)
        if f is None and _is_attribute(getattr(model, last, None)):
            return Source(name=name, path=path, kind="attribute")
    if f is None:
        return why
    if not f.concrete or f.many_to_many:
        return f"{last!r} is {_describe(f)} of {current._meta.label}, not a single value."
    return Source(name=name, path=path, kind="path" if hops else "column", field=f)
