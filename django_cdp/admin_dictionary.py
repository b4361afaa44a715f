"""The event dictionary in the admin: every planned event with its 7-day count and last seen.

Kept out of ``django_cdp/admin.py`` (the delivery log), which takes in
:func:`get_urls`, the dictionary page's URL wrapped in the admin site's
``admin_view`` (``/admin/django_cdp/message/dictionary/``). The delivery log's
filter for messages with tracking-plan violations is
``django_cdp.admin_filters.FlaggedFilter``.

The page costs one grouped query over the last 7 days (an index range on
``created_at``) and, when some planned events were not seen in that window, one
grouped query for their last-seen dates.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Max, Q
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from django_cdp.admin_permissions import can_view_messages
from django_cdp.dictionary import get_dictionary
from django_cdp.models import Message

WINDOW = timedelta(days=7)
IDENTIFY = "(identify)"


def event_activity(using: str = "default") -> dict[str, dict[str, Any]]:
    """Per event name (identifies under :data:`IDENTIFY`): 7-day count, flagged and last seen."""
    since = timezone.now() - WINDOW
    rows = (
        Message.objects.using(using)
        .filter(created_at__gte=since)
        .values("type", "event")
        .annotate(
            count=Count("id"),
            flagged=Count("id", filter=~Q(violations=[])),
            last_seen=Max("created_at"),
        )
        .order_by()
    )
    activity: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = IDENTIFY if row["type"] == Message.Type.IDENTIFY else row["event"]
        entry = activity.setdefault(name, {"count": 0, "flagged": 0, "last_seen": None})
        entry["count"] += row["count"]
        entry["flagged"] += row["flagged"]
        if entry["last_seen"] is None or row["last_seen"] > entry["last_seen"]:
            entry["last_seen"] = row["last_seen"]
    return activity


def _last_seen_before(names: list[str], using: str) -> dict[str, Any]:
    """When each of ``names`` (events not seen in the window) was last written.

    One grouped query for all of them: the outbox keeps no index on the event name
    (every delivered message would pay for its entry), so one scan answers every
    name at once instead of one scan per name. Identifies come from the newest row
    of their type, read backwards along ``created_at``.
    """
    found: dict[str, Any] = {}
    queryset = Message.objects.using(using)
    if IDENTIFY in names:
        found[IDENTIFY] = queryset.filter(type=Message.Type.IDENTIFY).aggregate(
            last=Max("created_at")
        )["last"]
    events = [name for name in names if name != IDENTIFY]
    if events:
        rows = (
            queryset.filter(type=Message.Type.TRACK, event__in=events)
            .values("event")
            .annotate(last=Max("created_at"))
            .order_by()
        )
        found.update((row["event"], row["last"]) for row in rows)
    return found


def dictionary_view(
    request: HttpRequest, admin_site: admin.AdminSite | None = None
) -> HttpResponse:
    """The dictionary page, for the users who may see the log (:func:`can_view_messages`)."""
    if not can_view_messages(request.user):
        raise PermissionDenied
    site = admin_site or admin.site
    d = get_dictionary()
    activity = event_activity()
    planned = [
        (IDENTIFY, None, "identify", d.identity_model),
        *(
            (n, d.events[n], d.events[n].trigger, d.events[n].source_model)
            for n in sorted(d.events)
        ),
    ]
    earlier = _last_seen_before([p[0] for p in planned if p[0] not in activity], "default")
    rows = []
    for name, spec, trigger, source in planned:
        seen = activity.pop(name, None)
        last_seen = seen["last_seen"] if seen else earlier.get(name)
        rows.append(
            {
                "name": "Identify" if name == IDENTIFY else name,
                "trigger": trigger,
                "source_model": source,
                "description": spec.description if spec else "",
                "properties": spec.properties if spec else d.traits,
                "count": seen["count"] if seen else 0,
                "flagged": seen["flagged"] if seen else 0,
                "last_seen": last_seen,
            }
        )
    unplanned = [
        {"name": name, **entry} for name, entry in sorted(activity.items()) if name != IDENTIFY
    ]
    context = {
        **site.each_context(request),
        "title": "Event dictionary",
        "opts": Message._meta,
        "rows": rows,
        "unplanned": unplanned,
        "window_days": WINDOW.days,
    }
    return TemplateResponse(request, "django_cdp/dictionary/admin_page.html", context)


def get_urls(admin_site: admin.AdminSite | None = None) -> list[URLPattern]:
    """The dictionary page's URL, behind ``admin_site``'s login and staff check."""
    site = admin_site or admin.site

    def view(request: HttpRequest) -> HttpResponse:
        return dictionary_view(request, site)

    return [path("dictionary/", site.admin_view(view), name="django_cdp_dictionary")]
