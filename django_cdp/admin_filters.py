"""The delivery log's list filters, and the query parameters they accept.

Every filter here matches on an indexed column and knows its choices without
reading the table (from the tracking plan, the registry or fixed windows). The
changelist accepts no other query parameter: :func:`filter_parameters` is the
allowlist ``MessageAdmin.lookup_allowed()`` answers from, so
``?payload__icontains=`` or ``?last_error__regex=`` (a full scan of the
outbox) is refused as Django refuses any disallowed lookup, with a 400.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from django_cdp.dictionary import get_dictionary
from django_cdp.registry import registry


class _ExactFilter(admin.SimpleListFilter):
    """Choices known without reading the table; the choice is matched on an indexed column."""

    parameter_name: str  # every subclass names its column

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset.filter(**{self.parameter_name: value}) if value else queryset


class EventNameFilter(_ExactFilter):
    """Event names from the tracking plan (the event dictionary), not ``SELECT DISTINCT``."""

    title = "event name"
    parameter_name = "event"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [(name, name) for name in sorted(get_dictionary().events)]


class SourceModelFilter(_ExactFilter):
    """The registered models (from the registry), matched on the indexed ``source_model``."""

    title = "source model"
    parameter_name = "source_model"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        labels = {config.model._meta.label_lower for config in registry}
        return [(label, label) for label in sorted(labels)]


class SourceObjectFilter(_ExactFilter):
    """One changed object's messages: the link of ``AnalyticsEventsMixin`` (``?source_pk=``).

    Its only choice is the one in the URL, so the sidebar shows which object the
    log is narrowed to and how to leave it; it pairs with :class:`SourceModelFilter`
    on the ``(source_model, source_pk)`` index.
    """

    title = "source object"
    parameter_name = "source_pk"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        value = self.value()
        return [(value, f"#{value}")] if value else []


class CreatedFilter(admin.SimpleListFilter):
    """A date range on the indexed ``created_at``, in the windows people ask about."""

    title = "created"
    parameter_name = "created"
    RANGES = {
        "1h": ("Last hour", timedelta(hours=1)),
        "24h": ("Last 24 hours", timedelta(days=1)),
        "7d": ("Last 7 days", timedelta(days=7)),
        "30d": ("Last 30 days", timedelta(days=30)),
    }

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [(key, label) for key, (label, _) in self.RANGES.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value in self.RANGES:
            return queryset.filter(created_at__gte=timezone.now() - self.RANGES[value][1])
        return queryset


class FlaggedFilter(admin.SimpleListFilter):
    """Messages that broke the tracking plan (``VALIDATION = "flag"`` or ``"block"``)."""

    title = "tracking plan"
    parameter_name = "flagged"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("yes", "With violations"), ("no", "Conforming")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.exclude(violations=[])
        if self.value() == "no":
            return queryset.filter(violations=[])
        return queryset


def filter_parameters(model_admin: admin.ModelAdmin, request: HttpRequest) -> frozenset[str]:
    """The query parameters of ``model_admin``'s list filters, as the filters themselves name them.

    A custom filter names its ``parameter_name``; a field filter (``"status"``) is
    asked for its ``expected_parameters()`` (``status__exact``, ``status__isnull``),
    built with no parameters, which reads nothing from the database for the
    log's choice fields.
    """
    names: set[str] = set()
    for item in model_admin.get_list_filter(request):
        if isinstance(item, type) and issubclass(item, admin.SimpleListFilter):
            if item.parameter_name:
                names.add(item.parameter_name)
        elif isinstance(item, str):
            field = model_admin.opts.get_field(item)
            spec = admin.FieldListFilter.create(
                field,  # type: ignore[arg-type]  # Django's admin also filters on relations
                request,
                {},
                model_admin.model,
                model_admin,
                field_path=item,
            )
            names.update(name for name in spec.expected_parameters() if name)
    return frozenset(names)
