"""Tracked versions of the ORM's bulk operations, which send no model signals.

``bulk_create``, ``bulk_update`` and ``QuerySet.update()`` bypass ``pre_save``
and ``post_save``, so django-cdp cannot see them. These helpers do the same
work and then record the same messages a loop of ``save()`` calls would:
``Created`` per new row, ``Updated`` (with ``changed_fields``) per row whose
tracked fields really changed, and one identify per owner. They run in one
transaction with the change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from django.db import models, router, transaction

from django_cdp.capture import engines, signals
from django_cdp.registry import registry
from django_cdp.scope import tracking_active

M = TypeVar("M", bound=models.Model)


def _config(model: type[models.Model]):
    config = registry.get(model)
    if config is None:
        raise TypeError(f"{model._meta.label} is not registered in DJANGO_CDP['MODELS']")
    return config


def _recorded(model: type[models.Model], using: str) -> bool:
    """Whether the helper records the messages (the signal engine), or the triggers do."""
    return tracking_active() and engines.engine_for(model, using) == engines.SIGNALS


def _before(model: type[models.Model], using: str, pks: list[Any], config) -> dict:
    """Tracked column values of many rows as the database holds them, in one query."""
    columns = list(config.tracked_columns)
    if not columns or not pks:
        return {}
    rows = model._base_manager.using(using).filter(pk__in=pks).values_list("pk", *columns)
    return {row[0]: dict(zip(columns, row[1:], strict=True)) for row in rows}


def _record_updates(
    instances: Iterable[models.Model],
    before: dict,
    config,
    using: str,
    written: frozenset[str] | None,
) -> None:
    for instance in instances:
        if instance.pk in before:
            signals.remember_before(instance, before[instance.pk], written)
        signals.guarded(signals.after_save, instance, config, False, using)


def bulk_create(objs: Iterable[M], *, using: str | None = None, **kwargs: Any) -> list[M]:
    """``Model.objects.bulk_create(objs, **kwargs)``, recording a ``Created`` per row.

    Needs a backend that returns primary keys from bulk inserts (PostgreSQL,
    SQLite ≥ 3.35, MariaDB ≥ 10.5); rows without a pk afterwards cannot be
    tracked and raise ``ValueError`` before anything is written.
    """
    objs = list(objs)
    if not objs:
        return objs
    model = type(objs[0])
    config = _config(model)
    using = using or router.db_for_write(model)
    with transaction.atomic(using=using, savepoint=False):
        created = model._default_manager.using(using).bulk_create(objs, **kwargs)
        if _recorded(model, using):
            if any(obj.pk is None for obj in created):
                raise ValueError(
                    f"bulk_create on {using!r} did not return primary keys: "
                    "django-cdp cannot track these rows"
                )
            for obj in created:
                signals.guarded(signals.after_save, obj, config, True, using)
    return created


def bulk_update(
    objs: Iterable[models.Model], fields: Sequence[str], *, using: str | None = None, **kwargs: Any
) -> int:
    """``Model.objects.bulk_update(objs, fields, **kwargs)``, recording an ``Updated`` per
    row whose tracked fields changed (one extra query reads the old values)."""
    objs = list(objs)
    if not objs:
        return 0
    model = type(objs[0])
    config = _config(model)
    using = using or router.db_for_write(model)
    written = signals.written_columns(config, frozenset(fields))
    with transaction.atomic(using=using, savepoint=False):
        active = _recorded(model, using)
        before = _before(model, using, [o.pk for o in objs], config) if active else {}
        count = model._default_manager.using(using).bulk_update(objs, fields, **kwargs)
        if active:
            _record_updates(objs, before, config, using, written)
    return count


def queryset_update(queryset: models.QuerySet, **values: Any) -> int:
    """``queryset.update(**values)``, recording an ``Updated`` per row that really changed.

    Reads the matched rows' tracked columns before and the rows after (two
    extra queries), so expressions such as ``F("amount") + 1`` are tracked
    with their results.
    """
    model = queryset.model
    config = _config(model)
    using = queryset.db
    with transaction.atomic(using=using, savepoint=False):
        if not _recorded(model, using):
            return queryset.update(**values)
        pks = list(queryset.values_list("pk", flat=True))
        before = _before(model, using, pks, config)
        count = model._base_manager.using(using).filter(pk__in=pks).update(**values)
        # Read back: the rows as the database holds them (expressions such as F() resolved).
        after = model._base_manager.using(using).filter(pk__in=pks)
        _record_updates(after, before, config, using, None)
    return count
