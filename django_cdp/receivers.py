"""Signal receivers: the bridge from Django's model signals to the outbox writer.

They are connected per registered model (``sender=model``), never to every
model: a ``pre_delete`` listener on all models would disable Django's fast
deletes project-wide. ``connect()`` runs in ``AppConfig.ready()`` and again
whenever ``DJANGO_CDP`` changes (``override_settings`` in tests).
"""

from __future__ import annotations

from typing import Any

from django.core.signals import setting_changed
from django.db import models
from django.db.models.signals import post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver

from django_cdp import outbox
from django_cdp.context import tracking_active
from django_cdp.registry import registry
from django_cdp.settings import SETTING_NAME

_connected: list[type[models.Model]] = []


def _pre_save(sender, instance, raw, using, update_fields, **kwargs: Any) -> None:
    config = registry.get(sender)
    if raw or config is None or not tracking_active():
        return
    outbox.guarded(outbox.before_save, instance, config, using, update_fields)


def _post_save(sender, instance, created, raw, using, **kwargs: Any) -> None:
    config = registry.get(sender)
    if raw or config is None or not tracking_active():
        outbox.forget_before(instance)
        return
    outbox.guarded(outbox.after_save, instance, config, created, using)


def _pre_delete(sender, instance, using, **kwargs: Any) -> None:
    config = registry.get(sender)
    if config is None or not tracking_active():
        return
    outbox.guarded(outbox.before_delete, instance, config, using)


def _post_delete(sender, instance, using, **kwargs: Any) -> None:
    config = registry.get(sender)
    if config is None or not tracking_active():
        return
    outbox.guarded(outbox.after_delete, instance, config, using)


_RECEIVERS = (
    (pre_save, _pre_save),
    (post_save, _post_save),
    (pre_delete, _pre_delete),
    (post_delete, _post_delete),
)


def connect() -> None:
    """Connect the receivers to every registered model (and only those)."""
    disconnect()
    for config in registry:
        for signal, func in _RECEIVERS:
            signal.connect(
                func, sender=config.model, weak=False, dispatch_uid=_uid(func, config.model)
            )
        _connected.append(config.model)


def disconnect() -> None:
    while _connected:
        model = _connected.pop()
        for signal, func in _RECEIVERS:
            signal.disconnect(sender=model, dispatch_uid=_uid(func, model))


def _uid(func, model: type[models.Model]) -> str:
    return f"django_cdp.{func.__name__}.{model._meta.label_lower}"


@receiver(setting_changed)
def _reconnect_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        connect()
