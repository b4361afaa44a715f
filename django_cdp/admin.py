"""The delivery log: the outbox, read-only, in the Django admin.

The outbox table is also the delivery log, and on a busy site it holds
millions of rows, so every page here is built to cost a fixed handful of
indexed queries: the changelist never counts the whole table (the count is
capped), the filters' choices come from the tracking plan rather than a
``SELECT DISTINCT``, and search uses exact matches on indexed columns.

Nothing can be added or edited by hand (a message is a record of what
happened); failed messages can be requeued by users with the change
permission; only superusers can delete.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import urlencode

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Q, QuerySet
from django.db.models.functions import Length, Substr
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from django_cdp import admin_dictionary, health
from django_cdp.admin_filters import (
    CreatedFilter,
    EventNameFilter,
    FlaggedFilter,
    SourceModelFilter,
    SourceObjectFilter,
    filter_parameters,
)
from django_cdp.admin_permissions import can_view_messages
from django_cdp.dictionary import get_dictionary
from django_cdp.models import DeliveryAttempt, Message

#: The changelist counts at most this many matching rows (``COUNT`` over a ``LIMIT``).
COUNT_CAP = 10_000
#: The live page returns at most this many messages per poll.
LIVE_LIMIT = 50
#: ... and at most this many characters of each one's payload (the rest is on its detail page).
LIVE_PAYLOAD_CHARS = 2_000
#: The message detail page lists at most this many delivery attempts, newest first.
ATTEMPTS_LIMIT = 50


def _request_delivery() -> Any:
    """``django_cdp.kick.request_delivery``, imported on use so that the admin loads no Celery."""
    from django_cdp.kick import request_delivery

    return request_delivery


class CappedCountPaginator(Paginator):
    """A paginator whose count stops at :data:`COUNT_CAP`.

    ``SELECT COUNT(*) FROM (SELECT ... LIMIT cap+1)`` costs at most ``cap`` index
    entries however big the table is; past the cap the log shows "10000" and
    the last pages are reached by filtering, not paging.
    """

    object_list: QuerySet  # the admin pages querysets

    @cached_property
    def count(self) -> int:
        return min(self.object_list[: COUNT_CAP + 1].count(), COUNT_CAP)


class MessageChangeList(ChangeList):
    """The log's changelist: its rows never load ``payload``, the one large column.

    A payload can be hundreds of kilobytes; a page of 100 rows would read them all
    for columns that never show them. The detail page loads the full row.
    """

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet:
        return super().get_queryset(request, exclude_parameters).defer("payload")


def _pretty(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False)


def matching(term: str) -> Q:
    """The messages a search term names: an exact ``userId`` or ``messageId`` (both
    indexed), or, when the term is the name of an event of the tracking plan, that
    event's messages.

    ``icontains`` would scan a million rows. An event name is matched on its own: the
    event column has no index (every delivered message would pay for its entry, see
    ``Message.Meta``), so an ``OR`` with it would make every search a scan of the table,
    while an event's messages alone are read newest first along the primary key.
    """
    if term in get_dictionary().events:
        return Q(event=term)
    return Q(user_id=term) | Q(message_id=term)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    """The delivery log. Read-only; see the module docstring for what stays cheap and why."""

    list_display = (
        "created_at",
        "type",
        "event",
        "user_id",
        "status",
        "attempts",
        "last_response_code",
        "sent_at",
    )
    list_display_links = ("created_at", "event")
    list_filter = (
        "status",
        "type",
        EventNameFilter,
        SourceModelFilter,
        SourceObjectFilter,
        CreatedFilter,
        FlaggedFilter,
    )
    search_fields = ("user_id", "message_id", "event")
    search_help_text = "Exact userId, messageId or event name."
    ordering = ("-id",)
    show_full_result_count = False
    paginator = CappedCountPaginator
    list_per_page = 100
    list_select_related = ()  # Message has no foreign keys: one query for the page.
    actions = ("requeue",)
    change_list_template = "admin/django_cdp/message/change_list.html"
    change_form_template = "admin/django_cdp/message/change_form.html"
    fieldsets = (
        (None, {"fields": ("summary", "message_id", "type", "event", "user_id", "source")}),
        (
            "Delivery",
            {
                "fields": (
                    "status",
                    "attempts",
                    "created_at",
                    "last_attempt_at",
                    "sent_at",
                    "next_attempt_at",
                    "last_response_code",
                    "error",
                )
            },
        ),
        ("Payload (as sent; delivery adds sentAt)", {"fields": ("pretty_payload",)}),
    )
    readonly_fields = flatten_fieldsets(fieldsets)  # every field shown is read-only

    # --- permissions ---------------------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        # Messages are records: never edited by hand. Requeue has its own permission check.
        return False

    def has_view_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        """The rule of every page that shows messages: :func:`can_view_messages`."""
        return can_view_messages(request.user)

    def has_delete_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return request.user.is_superuser

    def has_requeue_permission(self, request: HttpRequest) -> bool:
        """Requeueing changes rows, so it needs the model's real change permission."""
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    # --- filters and search: only the log's own, on indexed columns -----------------------------

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        """Only the parameters of the log's own filters (:func:`filter_parameters`).

        Django's default allows any lookup on a local field, so ``?payload__icontains=``
        or ``?last_error__regex=`` in the URL would scan the whole outbox. Refused, the
        changelist raises ``DisallowedModelAdminLookup``, which Django answers with a 400.
        """
        return lookup in filter_parameters(self, request)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return MessageChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """Exact ``userId``, ``messageId`` or planned event name (:func:`matching`)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(matching(term)), False

    # --- actions ---------------------------------------------------------------------------------

    @admin.action(description="Requeue selected failed messages", permissions=["requeue"])
    def requeue(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Make failed messages due now with a fresh attempt budget.

        ``last_error`` and ``last_response_code`` are kept, so the detail page still
        shows why the message failed until the next attempt overwrites them.
        Messages in any other status are left alone (a pending row may be leased by
        a worker right now; a sent one must not be sent twice).
        """
        using = queryset.db
        n = queryset.filter(status=Message.Status.FAILED).update(
            status=Message.Status.PENDING,
            attempts=0,
            next_attempt_at=timezone.now(),
            locked_until=None,
            locked_by="",
        )
        if n:
            request_delivery = _request_delivery()
            transaction.on_commit(lambda: request_delivery(using), using=using)
            self.message_user(request, f"Requeued {n} failed message(s).", messages.SUCCESS)
        else:
            self.message_user(
                request,
                "No failed message was selected: only failed messages can be requeued.",
                messages.WARNING,
            )

    # --- detail ----------------------------------------------------------------------------------

    @admin.display(description="call")
    def summary(self, obj: Message) -> str:
        """The call as a person reads it: who, what, which properties or traits, when."""
        try:
            data = obj.data
        except ValueError:
            return "(payload is not valid JSON)"
        who = data.get("userId") or data.get("anonymousId") or "?"
        when = timezone.localtime(obj.created_at).strftime("%Y-%m-%d %H:%M:%S %Z")
        if obj.type == Message.Type.IDENTIFY:
            fields = data.get("traits") or {}
            head = format_html("Identify <b>{}</b> with traits", who)
        else:
            fields = data.get("properties") or {}
            head = format_html("<b>{}</b> did <b>{}</b> with properties", who, obj.event)
        items = format_html(
            "<ul>{}</ul>",
            mark_safe(
                "".join(
                    str(format_html("<li><code>{}</code>: {}</li>", k, json.dumps(v)))
                    for k, v in fields.items()
                )
            ),
        )
        return format_html("{} {}<div>written {}</div>", head, items, when)

    @admin.display(description="payload")
    def pretty_payload(self, obj: Message) -> str:
        try:
            text = _pretty(obj.data)
        except ValueError:
            text = obj.payload
        return format_html('<pre class="cdp-payload" style="white-space: pre-wrap">{}</pre>', text)

    @admin.display(description="last error")
    def error(self, obj: Message) -> str:
        if not obj.last_error:
            return "-"
        return format_html(
            '<pre class="cdp-error" style="white-space: pre-wrap">{}</pre>',
            health.mask_secrets(obj.last_error),
        )

    @admin.display(description="source object")
    def source(self, obj: Message) -> str:
        """A link to the changed object's own admin page, without loading the object."""
        if not obj.source_model:
            return "-"
        label = f"{obj.source_model} #{obj.source_pk}"
        try:
            model = apps.get_model(obj.source_model)
        except (LookupError, ValueError):
            return label
        if model not in self.admin_site._registry:
            return label
        try:
            url = reverse(
                f"{self.admin_site.name}:{model._meta.app_label}_{model._meta.model_name}_change",
                args=[obj.source_pk],
            )
        except NoReverseMatch:
            return label
        return format_html('<a href="{}">{}</a>', url, label)

    # --- pages -----------------------------------------------------------------------------------

    def get_urls(self) -> list:
        wrap = self.admin_site.admin_view
        return [
            path("health/", wrap(self.health_view), name=self._url_name("health")),
            path("live/", wrap(self.live_view), name=self._url_name("live")),
            path("live/data/", wrap(self.live_data_view), name=self._url_name("live_data")),
            *admin_dictionary.get_urls(self.admin_site),
            *super().get_urls(),
        ]

    def _url_name(self, suffix: str) -> str:
        return f"{self.opts.app_label}_{self.opts.model_name}_{suffix}"

    def _reverse(self, suffix: str) -> str:
        return reverse(f"{self.admin_site.name}:{self._url_name(suffix)}")

    def _links(self) -> list[tuple[str, str]]:
        return [
            ("Live events", self._reverse("live")),
            ("Delivery health", self._reverse("health")),
            ("Event dictionary", reverse(f"{self.admin_site.name}:django_cdp_dictionary")),
        ]

    def _require_view(self, request: HttpRequest) -> None:
        """Staff who may not see messages get 403, as the admin's own views answer."""
        if not self.has_view_permission(request):
            raise PermissionDenied

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        extra_context = {
            **(extra_context or {}),
            "cdp_status": health.delivery_status(self._using(request)),
            "cdp_links": self._links(),
        }
        return super().changelist_view(request, extra_context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        extra_context = {**(extra_context or {}), "cdp_links": self._links()}
        response = super().change_view(request, object_id, form_url, extra_context)
        # The attempts are read only once the admin has found the message and checked
        # the permissions (``original`` is the loaded row): one query on the FK index.
        context = getattr(response, "context_data", None)
        if isinstance(context, dict) and isinstance(context.get("original"), Message):
            context.update(self.attempts_context(context["original"]))
        return response

    def attempts_context(self, message: Message) -> dict[str, Any]:
        """The message's newest failed attempts for the detail page, in one bounded query.

        Only failures are recorded (a success is the row's own ``sent_at`` and last
        response code); at most :data:`ATTEMPTS_LIMIT` are listed, and one more is
        fetched to tell whether older ones exist, instead of counting them.
        """
        rows = list(
            DeliveryAttempt.objects.using(message._state.db or "default")
            .filter(message=message)
            .order_by("-id")
            .only(
                "id",
                "number",
                "at",
                "outcome",
                "response_code",
                "response_excerpt",
                "error",
                "duration_ms",
            )[: ATTEMPTS_LIMIT + 1]
        )
        attempts = [
            {
                "number": a.number,
                "at": a.at,
                "outcome": a.outcome,
                "outcome_label": a.get_outcome_display(),
                "response_code": a.response_code,
                "duration_ms": a.duration_ms,
                # Masked again when shown, like ``last_error``: the key may have changed.
                "error": health.mask_secrets(a.error),
                "excerpt": health.mask_secrets(a.response_excerpt),
            }
            for a in rows[:ATTEMPTS_LIMIT]
        ]
        return {
            "cdp_attempts": attempts,
            "cdp_attempts_more": len(rows) > ATTEMPTS_LIMIT,
            "cdp_attempts_limit": ATTEMPTS_LIMIT,
        }

    def health_view(self, request: HttpRequest) -> HttpResponse:
        """Delivery health: counts per window, oldest pending, delays, errors, 24 h chart."""
        self._require_view(request)
        using = self._using(request)
        figures = health.report(using)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Delivery health",
            "cdp_status": figures["status"],
            "figures": figures,
            "windows": [(name, figures["windows"][name]) for name, _ in health.WINDOWS],
            # Built from numbers and fixed text.
            "chart": mark_safe(health.hourly_svg(figures["hours"])),
            "chart_colors": health.CHART_COLORS.items(),
            "write_key": health.masked_write_key(),
            "changelist_url": self._reverse("changelist"),
        }
        return TemplateResponse(request, "admin/django_cdp/message/health.html", context)

    def _using(self, request: HttpRequest) -> str:
        return self.get_queryset(request).db

    def live_view(self, request: HttpRequest) -> HttpResponse:
        """The newest messages as they are written; a few lines of JS poll the data view."""
        self._require_view(request)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Live events",
            "data_url": self._reverse("live_data"),
            "changelist_url": self._reverse("changelist"),
        }
        return TemplateResponse(request, "admin/django_cdp/message/live.html", context)

    def live_data_view(self, request: HttpRequest) -> JsonResponse:
        """Messages newer than ``after`` (an id), newest first, at most :data:`LIVE_LIMIT`.

        One query on the primary key (plus an exact ``q``: :func:`matching`),
        so polling every two seconds costs the same on a million rows as on ten. The
        answer is bounded too: the database returns at most :data:`LIVE_PAYLOAD_CHARS`
        of each payload, so a burst of large payloads cannot make a poll megabytes
        long. A payload that fits is sent parsed; a longer one as its first
        characters, with ``payload_truncated`` set (the detail page shows it whole).
        ``payload_chars`` is the stored payload's full length in characters.
        """
        self._require_view(request)
        try:
            after = int(request.GET.get("after") or 0)
        except ValueError:
            after = 0
        qs = self.get_queryset(request).filter(id__gt=after)
        term = (request.GET.get("q") or "").strip()
        if term:
            qs = qs.filter(matching(term))
        rows = list(
            qs.order_by("-id")
            .annotate(
                payload_start=Substr("payload", 1, LIVE_PAYLOAD_CHARS),
                payload_chars=Length("payload"),
            )
            .values(
                "id",
                "created_at",
                "type",
                "event",
                "user_id",
                "status",
                "payload_start",
                "payload_chars",
            )[:LIVE_LIMIT]
        )
        change = self._reverse("changelist")
        messages_out = []
        for r in rows:
            truncated = r["payload_chars"] > LIVE_PAYLOAD_CHARS
            payload = r["payload_start"]
            if not truncated:
                with contextlib.suppress(ValueError):  # an unparsable payload is sent as text
                    payload = json.loads(payload)
            messages_out.append(
                {
                    "id": r["id"],
                    "created_at": timezone.localtime(r["created_at"]).isoformat(),
                    "type": r["type"],
                    "event": r["event"],
                    "user_id": r["user_id"],
                    "status": r["status"],
                    "payload": payload,
                    "payload_truncated": truncated,
                    "payload_chars": r["payload_chars"],
                    "url": f"{change}{r['id']}/change/",
                }
            )
        last_id = rows[0]["id"] if rows else after
        return JsonResponse({"messages": messages_out, "last_id": last_id})


class AnalyticsEventsMixin:
    """Add an "Analytics events" section to a registered model's admin change page.

    ``class PayoutAdmin(AnalyticsEventsMixin, admin.ModelAdmin)`` lists the newest
    messages emitted for the object (matched on the indexed ``source_model`` and
    ``source_pk``, so it is one bounded query) with a link to the full, filtered
    delivery log. Only users who may see the delivery log see it
    (:func:`~django_cdp.admin_permissions.can_view_messages`): payloads are
    customer data. If your admin has its own ``change_form_template``, include
    ``django_cdp/admin/object_events.html`` in it instead.
    """

    change_form_template = "django_cdp/admin/change_form_with_events.html"
    #: How many messages the section lists; the link shows them all.
    analytics_events_limit = 20

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        extra_context = {
            **(extra_context or {}),
            **self.analytics_events_context(request, object_id),
        }
        return super().change_view(request, object_id, form_url, extra_context)  # type: ignore[misc]

    def analytics_events_context(self, request: HttpRequest, object_id: str) -> dict[str, Any]:
        """The template context of the section, empty when the user may not see messages."""
        if not can_view_messages(request.user):
            return {}
        opts = self.model._meta  # type: ignore[attr-defined]
        site_name = self.admin_site.name  # type: ignore[attr-defined]
        label = opts.label_lower
        rows = list(
            Message.objects.filter(source_model=label, source_pk=str(object_id))
            .order_by("-id")
            .only("id", "created_at", "type", "event", "user_id", "status", "sent_at")[
                : self.analytics_events_limit
            ]
        )
        changelist = reverse(f"{site_name}:django_cdp_message_changelist")
        query = urlencode({"source_model": label, "source_pk": object_id})
        return {
            "cdp_object_events": rows,
            "cdp_object_events_url": f"{changelist}?{query}",
            "cdp_message_changelist": changelist,
        }
