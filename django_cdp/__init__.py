"""django-cdp: automatic, loss-free customer-data tracking for Django.

Model changes become RudderStack/Segment ``track`` and ``identify`` messages,
written to an outbox in the same transaction as the change and delivered by
Celery workers. The functions below are for the calls that are not model
changes; they are imported lazily so that importing the package never loads
models before Django's app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "bulk_create",
    "bulk_update",
    "context",
    "identify",
    "queryset_update",
    "track",
    "tracking_disabled",
]

if TYPE_CHECKING:
    from django_cdp.api import identify, track, tracking_disabled
    from django_cdp.bulk import bulk_create, bulk_update, queryset_update
    from django_cdp.scope import context

_LAZY = {
    "identify": "django_cdp.api",
    "track": "django_cdp.api",
    "tracking_disabled": "django_cdp.api",
    "context": "django_cdp.scope",
    "bulk_create": "django_cdp.bulk",
    "bulk_update": "django_cdp.bulk",
    "queryset_update": "django_cdp.bulk",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'django_cdp' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
