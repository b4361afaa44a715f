"""The ``DJANGO_CDP`` settings dict, read through one object with defaults.

Projects configure django-cdp with a single dict in their settings module::

    DJANGO_CDP = {"WRITE_KEY": "...", "DATA_PLANE_URL": "...", "IDENTITY": {...}, "MODELS": {...}}

Everything in django-cdp reads it through :data:`cdp_settings`, never through
``django.conf.settings`` directly, so that defaults live in one place and
``override_settings(DJANGO_CDP=...)`` in tests takes effect at once (the cache
is dropped on Django's ``setting_changed`` signal). Nothing here validates:
``django_cdp.checks`` reports a bad dict through ``manage.py check``, naming the key.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

SETTING_NAME = "DJANGO_CDP"

#: Every top-level key and its default. A key missing here is unknown (check E001).
DEFAULTS: dict[str, Any] = {
    # Master switch: False records nothing at all.
    "ENABLED": True,
    # Data plane credentials; both empty means messages wait as pending (check W001).
    "WRITE_KEY": "",
    "DATA_PLANE_URL": "",
    # The identified customer model and its traits.
    "IDENTITY": None,
    # Registered models: label -> options.
    "MODELS": {},
    # Send an identify even when its traits equal the last one recorded for the user.
    "SEND_UNCHANGED_IDENTIFY": False,
    # Largest message (compact UTF-8 JSON) that is stored for sending; larger ones are failed.
    "MAX_MESSAGE_BYTES": 32 * 1024,
    # Dotted path to ``enrich(message: dict, instance: Model | None) -> dict | None``.
    "ENRICH_MESSAGE": None,
    # Delivery.
    "DELIVERY": "celery",
    "SEND": True,
    "QUEUE": None,
    "MAX_BATCH_BYTES": 500 * 1000,
    "MAX_BATCH_MESSAGES": 2500,
    "MAX_ATTEMPTS": 10,
    "GZIP": True,
    "CONNECT_TIMEOUT": 5.0,
    "READ_TIMEOUT": 15.0,
    "LEASE_SECONDS": 60,
    "DELIVERY_TIME_BUDGET": 50.0,
    # At most one kick per this many seconds per process and database (the sweep covers the rest).
    "KICK_DEBOUNCE_SECONDS": 0.25,
    # Retry backoff: the first delay, tripled per attempt (with jitter) up to the cap.
    "RETRY_BACKOFF_BASE": 10.0,
    "RETRY_BACKOFF_MAX": 12 * 3600.0,
    # Pause after 401/403/404 (a wrong key or URL), capped at a minute so a fix resumes at once.
    "CONFIG_ERROR_RETRY_SECONDS": 30.0,
    "RETENTION_DAYS": 30,  # days sent/skipped messages are kept (tasks.purge, cdp_purge)
    # Manual events of the tracking plan: name -> {"description", "properties": {...}}.
    "EVENTS": {},
    # Tracking-plan validation when a message is written: "flag", "raise", "block" or "off".
    "VALIDATION": "flag",
    # Identify on login: {"owner": "<field path from the user>" | "dotted.path.to.function",
    # "track_sign_in": False}; {} switches it off.
    "LOGIN": {},
    # The browser source ({% cdp_snippet %}): WRITE_KEY, DATA_PLANE_URL, SDK, SDK_URL, TRAITS.
    "FRONTEND": {},
}


class CdpSettings:
    """Attribute access to ``DJANGO_CDP`` merged over :data:`DEFAULTS`.

    ``cdp_settings.MAX_MESSAGE_BYTES`` returns the user's value or the default.
    An unknown attribute raises ``AttributeError`` so that typos in our own code
    fail loudly; unknown keys in the user's dict are reported by check E001.
    """

    def __init__(self) -> None:
        self._cache: dict[str, Any] | None = None

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
            self._cache = {**DEFAULTS, **self.user_settings}
        return self._cache

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Invalid django-cdp setting: {name!r}")
        return self._merged()[name]

    def reload(self) -> None:
        """Forget cached values; the next read sees the current settings module."""
        self._cache = None


cdp_settings = CdpSettings()


@receiver(setting_changed)
def _reload_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        cdp_settings.reload()
