"""Django's model-field API narrowed to what django-cdp maps: concrete columns and foreign keys.

Django types a field's ``column`` as optional and ``get_field`` as any field or relation,
since many-to-many fields and reverse relations have no column of their own. The registry
accepts only concrete fields and forward foreign keys in a mapping (a check names any other),
so the code that renders a mapping reads them through these functions, which fail naming the
field should that ever not hold.
"""

from __future__ import annotations

from django.db import models


def column(field: models.Field) -> str:
    """The database column of a concrete field."""
    if field.column is None:
        raise TypeError(f"{field!r} has no column of its own")
    return field.column


def foreign_key(model: type[models.Model], name: str) -> models.ForeignKey:
    """The forward foreign key (or one-to-one field) ``name`` of ``model``."""
    field = model._meta.get_field(name)
    if not isinstance(field, models.ForeignKey):
        raise TypeError(f"{model._meta.label}.{name} is not a foreign key")
    return field
