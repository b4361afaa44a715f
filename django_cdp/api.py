"""The public calls for what is not a model change.

Teams replace their hand-written ``analytics.track(...)`` and
``analytics.identify(...)`` with these: the messages go through the same
outbox, in the caller's transaction, with the same owner resolution and value
conversion as automatic events.
"""

from __future__ import annotations

from typing import Any

from django.db import models, router

from django_cdp.capture import signals
from django_cdp.models import Message
from django_cdp.registry import registry
from django_cdp.scope import tracking_active, tracking_disabled
from django_cdp.settings import cdp_settings

__all__ = ["identify", "track", "tracking_disabled"]


def _using(instance: models.Model) -> str:
    return instance._state.db or router.db_for_write(type(instance), instance=instance)


def _check_registered(instance: models.Model) -> None:
    if not isinstance(instance, models.Model) or registry.get(type(instance)) is None:
        raise TypeError(
            f"{instance!r} is not an instance of the identity model or of a model in "
            "DJANGO_CDP['MODELS']: django-cdp cannot tell whose event it is."
        )


def track(
    instance: models.Model, event: str, properties: dict[str, Any] | None = None
) -> Message | None:
    """Record a track ``event`` for the owner of ``instance``.

    ``instance`` is the identity model or any registered model; the userId is
    its owner's. Properties are converted like automatic ones (a value that
    cannot be sent raises ``PayloadError`` naming it). Returns the stored
    message, or None while tracking is off or when the owner has no consent
    (``CONSENT``: the event is counted as withheld, not stored).
    """
    _check_registered(instance)
    if not isinstance(event, str) or not event:
        raise ValueError("track() needs a non-empty event name")
    if not tracking_active():
        return None
    return signals.record_track(instance, event, properties or {}, _using(instance))


def identify(instance: models.Model, *, force: bool = False) -> None:
    """Identify the owner of ``instance`` with its current traits.

    Skipped when the traits equal the last identify recorded for the user
    (identify volume costs money), unless ``force=True`` or
    ``SEND_UNCHANGED_IDENTIFY``. Within one transaction the owner is
    identified at most once, with the final traits.
    """
    _check_registered(instance)
    if not tracking_active():
        return
    signals.record_identify(
        instance, _using(instance), force=force or cdp_settings.SEND_UNCHANGED_IDENTIFY
    )
