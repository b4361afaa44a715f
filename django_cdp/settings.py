"""The ``DJANGO_CDP`` settings dict, read through one object with defaults.

Projects configure django-cdp with a single dict in their settings module::

    DJANGO_CDP = {"WRITE_KEY": "...", "DATA_PLANE_URL": "...", "IDENTITY": {...}, "MODELS": {...}}

Everything in django-cdp reads it through :data:`cdp_settings`, never through
``django.conf.settings`` directly, so that ``override_settings(DJANGO_CDP=...)``
in tests takes effect at once (the cache is dropped on Django's
``setting_changed`` signal). As in Django REST framework's ``api_settings``, every
key's default, types and meaning are in one table (:data:`SETTINGS`) and dotted
paths are returned imported (:data:`IMPORT_STRINGS`). Nothing here validates:
``django_cdp.registry`` turns a bad dict into messages of ``manage.py check``
(``django_cdp.checks``), naming the key, using the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

SETTING_NAME = "DJANGO_CDP"


@dataclass(frozen=True)
class Setting:
    """One top-level key: its default, the types its value may have, and what it means.

    The table below is the single place a key is declared: ``cdp_settings`` takes
    the defaults from it, check ``E001`` the types and ``doc`` (which it quotes in
    its hint), so a new key cannot be readable but unchecked, or the other way round.
    """

    default: Any
    types: tuple[type, ...]
    doc: str


_NUMBER = (int, float)

#: Every top-level key. A key missing here is unknown (check E001).
SETTINGS: dict[str, Setting] = {
    "ENABLED": Setting(True, (bool,), "Master switch: False records nothing at all."),
    "WRITE_KEY": Setting(
        "", (str,), "The source's write key; empty means messages wait as pending (W001)."
    ),
    "DATA_PLANE_URL": Setting(
        "", (str,), "The data plane's base URL; empty means messages wait as pending (W001)."
    ),
    "IDENTITY": Setting(
        None, (dict,), "The identified customer model: {'model', 'user_id', 'traits'}."
    ),
    "MODELS": Setting({}, (dict,), "Registered models: 'app_label.Model' -> options."),
    "SEND_UNCHANGED_IDENTIFY": Setting(
        False, (bool,), "Send an identify even when its traits equal the last one recorded."
    ),
    "MAX_MESSAGE_BYTES": Setting(
        32 * 1024, (int,), "Largest message (compact UTF-8 JSON) stored for sending."
    ),
    "ENRICH_MESSAGE": Setting(
        None,
        (str, type(None)),
        "Dotted path to enrich(message, instance) -> dict | None, run on every message.",
    ),
    "DELIVERY": Setting(
        "celery",
        (str,),
        "'celery' kicks a worker after each commit; 'manual' leaves it to cdp_deliver.",
    ),
    "SEND": Setting(True, (bool,), "False records messages as skipped without sending them."),
    "QUEUE": Setting(None, (str, type(None)), "The Celery queue of the delivery task."),
    "MAX_BATCH_BYTES": Setting(500 * 1000, (int,), "Largest request body of one batch."),
    "MAX_BATCH_MESSAGES": Setting(2500, (int,), "Most messages in one batch."),
    "MAX_ATTEMPTS": Setting(10, (int,), "Attempts before a message becomes failed."),
    "GZIP": Setting(True, (bool,), "Gzip the request body."),
    "CONNECT_TIMEOUT": Setting(5.0, _NUMBER, "Seconds to connect to the data plane."),
    "READ_TIMEOUT": Setting(15.0, _NUMBER, "Seconds to wait for the data plane's answer."),
    "LEASE_SECONDS": Setting(60, _NUMBER, "How long a worker holds the messages it claimed."),
    "DELIVERY_TIME_BUDGET": Setting(
        50.0, _NUMBER, "Seconds one run of the delivery task keeps draining."
    ),
    "KICK_DEBOUNCE_SECONDS": Setting(
        0.25, _NUMBER, "At most one kick per this many seconds per process and database."
    ),
    "RETRY_BACKOFF_BASE": Setting(
        10.0, _NUMBER, "First retry delay in seconds, tripled per attempt (with jitter)."
    ),
    "RETRY_BACKOFF_MAX": Setting(12 * 3600.0, _NUMBER, "Longest retry delay in seconds."),
    "CONFIG_ERROR_RETRY_SECONDS": Setting(
        30.0, _NUMBER, "Pause after 401/403/404 (a wrong key or URL), at most 60 seconds."
    ),
    "RETENTION_DAYS": Setting(
        30, (int,), "Days sent and skipped messages are kept (tasks.purge, cdp_purge)."
    ),
    "EVENTS": Setting(
        {}, (dict,), "Manual events of the tracking plan: name -> {'description', 'properties'}."
    ),
    "VALIDATION": Setting(
        "flag", (str,), "Tracking-plan validation: 'flag', 'raise', 'block' or 'off'."
    ),
    "LOGIN": Setting(
        {}, (dict,), "Identify on login: {'owner': path or dotted function, 'track_sign_in'}."
    ),
    "FRONTEND": Setting(
        {}, (dict,), "The browser source of {% cdp_snippet %}: WRITE_KEY, DATA_PLANE_URL, ..."
    ),
    "REQUEST_CONTEXT": Setting(
        {},
        (dict,),
        "What RequestContextMiddleware adds to messages: {'ip', 'user_agent', 'page', 'locale', "
        "'request_id_header', 'anonymous_id', 'trusted_proxies'}.",
    ),
    "CONSENT": Setting(
        None,
        (str, type(None)),
        "Whose messages are written: a boolean field path on the identity model "
        "('analytics_opt_in'), or a dotted path to a function of the owner returning a bool.",
    ),
    "CAPTURE": Setting(
        "auto",
        (str,),
        "How changes are captured: 'auto' (triggers on PostgreSQL where the database can "
        "compute the mapping, signals elsewhere), 'signals' or 'triggers'.",
    ),
    "DEFER_STATEMENT_ROWS": Setting(
        1,
        (int, type(None)),
        "Triggers: a statement changing at least this many rows of a model (1: every "
        "statement) is stored whole and turned into messages by delivery; None writes every "
        "message in the statement.",
    ),
}

#: Keys whose value is a dotted path that ``cdp_settings`` returns imported (as DRF's
#: ``IMPORT_STRINGS``), so that no caller imports it and a bad path is one check error.
IMPORT_STRINGS = frozenset({"ENRICH_MESSAGE"})


def import_setting(name: str, path: str) -> Any:
    """Import the callable that the dotted ``path`` of setting ``name`` names.

    Raises ``ImportError`` whose message names the key and the path (whatever
    went wrong: a missing module or attribute, an error while importing the
    module, or something that is not callable), so that the same words appear
    in check ``E001`` and, if the check was ignored, in the log of a failed save.
    """
    try:
        value = import_string(path)
    except Exception as exc:
        raise ImportError(
            f"{SETTING_NAME}[{name!r}] = {path!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(value):
        raise ImportError(
            f"{SETTING_NAME}[{name!r}] = {path!r} is a {type(value).__name__}, not a function."
        )
    return value


class CdpSettings:
    """Attribute access to ``DJANGO_CDP`` merged over the defaults of :data:`SETTINGS`.

    ``cdp_settings.MAX_MESSAGE_BYTES`` returns the user's value or the default;
    a key of :data:`IMPORT_STRINGS` returns the imported callable (``None`` when
    unset), imported once per settings change. An unknown attribute raises
    ``AttributeError`` so that typos in our own code fail loudly; unknown keys in
    the user's dict are reported by check E001.
    """

    def __init__(self) -> None:
        self._cache: dict[str, Any] | None = None
        self._imported: dict[str, Any] = {}

    @property
    def raw(self) -> Any:
        """``DJANGO_CDP`` exactly as the settings module has it (``{}`` when absent)."""
        return getattr(django_settings, SETTING_NAME, {})

    @property
    def user_settings(self) -> dict[str, Any]:
        """The user's dict, or ``{}`` when it is not a dict (check E001 reports that)."""
        value = self.raw
        return value if isinstance(value, dict) else {}

    def _merged(self) -> dict[str, Any]:
        if self._cache is None:
            defaults = {name: setting.default for name, setting in SETTINGS.items()}
            self._cache = {**defaults, **self.user_settings}
        return self._cache

    def __getattr__(self, name: str) -> Any:
        if name not in SETTINGS:
            raise AttributeError(f"Invalid django-cdp setting: {name!r}")
        value = self._merged()[name]
        if name not in IMPORT_STRINGS:
            return value
        if not value:
            return None
        if name not in self._imported:
            # A failure is not cached: it raises (naming the key) on every use until fixed.
            self._imported[name] = import_setting(name, value)
        return self._imported[name]

    def reload(self) -> None:
        """Forget cached values; the next read sees the current settings module."""
        self._cache = None
        self._imported = {}


cdp_settings = CdpSettings()


@receiver(setting_changed)
def _reload_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        cdp_settings.reload()
