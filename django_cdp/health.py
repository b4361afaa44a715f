"""Delivery health, read from the outbox table itself.

The admin's health page, the delivery log's banner and ``manage.py cdp_health``
all use this module, so the page a person looks at and the exit code cron acts
on can never disagree. Every query is bounded: by a time window on the indexed
``created_at``, by the ``pending`` status (few rows when delivery works), or by
a ``LIMIT``; nothing counts the whole table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.db.models import Count, DurationField, ExpressionWrapper, F, Min, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from django_cdp.models import (
    DeferredStatement,
    DeliveryCount,
    DeliveryEndpoint,
    Message,
    WithheldCount,
    count_hour,
)
from django_cdp.settings import cdp_settings

#: Oldest pending message older than this: delivery is stuck (banner and default threshold).
STUCK_AFTER = timedelta(minutes=15)
#: Share of the last hour's finished messages that failed above which delivery is unhealthy.
MAX_FAILURE_RATE = 0.05
#: Response codes with which the data plane refuses the write key or URL.
CONFIG_ERROR_CODES = (401, 403, 404)
#: The write-to-sent delay percentiles are computed over at most this many recent messages.
DELAY_SAMPLE = 10_000
#: The most common errors are counted over at most this many dead letters (and as many
#: pending messages whose last try failed).
ERROR_SAMPLE = 5_000
#: A pending message refused for its write key or URL counts while it is due again within
#: this long (delivery retries those every 30 to 60 s); older ones show as stuck by age.
REFUSED_WITHIN = timedelta(minutes=10)

WINDOWS: tuple[tuple[str, timedelta], ...] = (
    ("hour", timedelta(hours=1)),
    ("day", timedelta(days=1)),
    ("week", timedelta(days=7)),
)
CHART_STATUSES = ("sent", "pending", "failed", "blocked", "skipped", "superseded")


def mask_secrets(text: str) -> str:
    """Replace the write key in ``text``: error texts can echo request details back."""
    key = cdp_settings.WRITE_KEY
    if text and isinstance(key, str) and len(key) >= 4:
        return text.replace(key, "****")
    return text


def masked_write_key() -> str:
    """How the admin shows the write key: whether it is set, never its value."""
    key = cdp_settings.WRITE_KEY
    return "set (hidden)" if key else "not set"


@dataclass
class Status:
    """The banner: is delivery working, and if not since when and why."""

    ok: bool
    oldest_pending_at: datetime | None
    oldest_pending_age: timedelta | None
    config_error: str | None = None
    config_error_code: int | None = None
    reasons: list[str] = field(default_factory=list)
    #: :func:`deferred_statements`: what the capture triggers deferred, not messages yet.
    deferred: dict[str, Any] = field(default_factory=dict)

    @property
    def oldest_pending_age_text(self) -> str:
        return _fmt_age(self.oldest_pending_age) if self.oldest_pending_age is not None else "-"

    @property
    def message(self) -> str:
        if self.ok:
            return "Everything is fine: nothing has been waiting for delivery too long."
        return "Delivery is stuck: " + "; ".join(self.reasons)


def delivery_status(
    using: str = "default",
    *,
    stuck_after: timedelta = STUCK_AFTER,
    now: datetime | None = None,
) -> Status:
    """Three small queries: the oldest pending row, a pending row the data plane refused, and
    the statements the capture triggers deferred that are not messages yet."""
    now = now or timezone.now()
    qs = Message.objects.using(using)
    oldest = (
        qs.filter(status=Message.Status.PENDING)
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    # Delivery puts refused rows a few seconds ahead (CONFIG_ERROR_RETRY_SECONDS): read
    # only the far end of the claim index, not every pending row.
    refused = (
        qs.filter(
            status=Message.Status.PENDING,
            next_attempt_at__gte=now - REFUSED_WITHIN,
            last_response_code__in=CONFIG_ERROR_CODES,
        )
        .order_by("-next_attempt_at")
        .values_list("last_response_code", "last_error")
        .first()
    )
    age = now - oldest if oldest is not None else None
    reasons = []
    if age is not None and age > stuck_after:
        reasons.append(
            f"the oldest pending message was written {_fmt_age(age)} ago "
            f"(at {timezone.localtime(oldest):%Y-%m-%d %H:%M:%S %Z})"
        )
    waiting = deferred_statements(using)
    if waiting["oldest"] is not None and now - waiting["oldest"] > stuck_after:
        reasons.append(
            f"{waiting['statements']} statement(s) of {waiting['rows']} rows deferred by the "
            f"capture triggers wait to become messages since "
            f"{_fmt_age(now - waiting['oldest'])} (delivery expands them before it claims)"
        )
    code, error = refused if refused else (None, None)
    if code is not None:
        reasons.append(
            f"the data plane answers {code} (check DJANGO_CDP['WRITE_KEY'] and ['DATA_PLANE_URL'])"
        )
    return Status(
        ok=not reasons,
        oldest_pending_at=oldest,
        oldest_pending_age=age,
        config_error=mask_secrets(error) if error else None,
        config_error_code=code,
        reasons=reasons,
        deferred=waiting,
    )


def data_plane_outage(using: str = "default") -> str | None:
    """Why the data plane counts as failing, or ``None``: stuck at once, like a wrong key.

    Read from the row delivery keeps per data plane (one query by primary key).
    """
    outage = (
        DeliveryEndpoint.objects.using(using)
        .filter(url=cdp_settings.DATA_PLANE_URL or "", failures__gt=0)
        .values_list("failing_since", "failures", "last_error")
        .first()
    )
    if outage is None:
        return None
    since, failures, last_error = outage
    return (
        f"the data plane has failed since {timezone.localtime(since):%Y-%m-%d %H:%M:%S %Z}"
        f" ({failures} failed request(s) in a row, last: {mask_secrets(last_error)[:200]}); "
        "delivery backs off and probes it"
    )


def deferred_statements(using: str = "default") -> dict[str, Any]:
    """The statements the capture triggers deferred that are not messages yet: how many, of
    how many rows, and the oldest one's time (None when there is none)."""
    found = DeferredStatement.objects.using(using).aggregate(
        statements=Count("id"), rows=Sum("row_count"), oldest=Min("created_at")
    )
    return {**found, "rows": found["rows"] or 0}


def _fmt_age(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[rank]


#: The columns of the window table, in order.
WINDOW_COLUMNS = ("written", "sent", "pending", "failed", "superseded")
#: Statuses counted from the messages themselves, each query on a partial index.
_ROW_COUNTED = ((Message.Status.PENDING,), (Message.Status.FAILED, Message.Status.BLOCKED))


#: Messages per UTC hour (the hour they were written in) and status.
Buckets = dict[datetime, dict[str, int]]


def _per_hour(using: str, since: datetime) -> Buckets:
    """Messages written since ``since`` per UTC hour and status, without reading a week of rows.

    Sent, skipped and superseded come from the hourly counters delivery keeps
    (:class:`~django_cdp.models.DeliveryCount`); pending, failed and blocked from
    the messages, through the partial indexes that hold only those statuses.
    """
    hours: dict[datetime, dict[str, int]] = {}
    counters = DeliveryCount.objects.using(using).filter(hour__gte=since)
    for hour, status, n in counters.values_list("hour", "status", "n"):
        hours.setdefault(count_hour(hour), {})[status] = n
    for statuses in _ROW_COUNTED:
        rows = (
            Message.objects.using(using)
            .filter(status__in=statuses, created_at__gte=since)
            .annotate(hour=TruncHour("created_at", tzinfo=dt_timezone.utc))
            .values("hour", "status")
            .annotate(n=Count("id"))
            .order_by()
        )
        for r in rows:
            bucket = hours.setdefault(count_hour(r["hour"]), {})
            bucket[r["status"]] = bucket.get(r["status"], 0) + r["n"]
    return hours


def week_buckets(using: str = "default", now: datetime | None = None) -> Buckets:
    """The widest window's hourly buckets, which every figure per window or hour is read from."""
    widest = max(span for _, span in WINDOWS)
    return _per_hour(using, count_hour((now or timezone.now()) - widest))


def window_counts(
    using: str = "default", now: datetime | None = None, buckets: Buckets | None = None
) -> dict[str, dict]:
    """Written/sent/pending/failed/superseded per window, read from hourly buckets.

    A window starts at the top of the hour its span reaches back to (the "hour"
    window holds the current and the previous clock hour's messages, at most).
    """
    now = now or timezone.now()
    hours = week_buckets(using, now) if buckets is None else buckets
    out = {}
    for name, span in WINDOWS:
        since = count_hour(now - span)
        totals: dict[str, int] = {}
        for hour, counts in hours.items():
            if hour >= since:
                for status, n in counts.items():
                    totals[status] = totals.get(status, 0) + n
        row = {column: totals.get(column, 0) for column in WINDOW_COLUMNS}
        row["written"] = sum(totals.values())
        out[name] = row
    return out


def delays(using: str = "default", now: datetime | None = None) -> dict[str, float | None]:
    """p50/p95 seconds from write to sent, over the last day's most recent sent messages."""
    now = now or timezone.now()
    # The difference is taken in the database: one duration per row is much cheaper to
    # load than two timestamps with time zones.
    delay = ExpressionWrapper(F("sent_at") - F("created_at"), output_field=DurationField())
    rows = (
        Message.objects.using(using)
        .filter(status=Message.Status.SENT, created_at__gte=now - timedelta(days=1))
        .order_by("-id")
        .annotate(delay=delay)
        .values_list("delay", flat=True)[:DELAY_SAMPLE]
    )
    values = sorted(d.total_seconds() for d in rows if d is not None)
    return {"p50": _percentile(values, 0.5), "p95": _percentile(values, 0.95), "n": len(values)}


def top_errors(using: str = "default", now: datetime | None = None, limit: int = 10) -> list[dict]:
    """The most common failure texts (first 200 characters) of the week, with a sample message.

    Over a bounded sample, like the delays: the :data:`ERROR_SAMPLE` most recent dead
    letters (the attention index, newest first) and the pending messages whose last
    try failed and that are due again within the last hour or later (the due index
    from its far end, where backoffs put them), so that a week with a hundred
    thousand failures costs no more than one with ten.
    """
    now = now or timezone.now()
    recent = Message.objects.using(using).filter(created_at__gte=now - timedelta(days=7))
    failed = recent.filter(status=Message.Status.FAILED).order_by("-id")
    # A failed try puts its row ahead (backoff) or, in an outage, due at once: rows due
    # more than an hour ago have not been tried since, and are not read.
    retrying = recent.filter(
        status=Message.Status.PENDING, next_attempt_at__gte=now - timedelta(hours=1)
    ).order_by("-next_attempt_at")
    # Dead letters always carry an error: filtering on it would only make the planner
    # underestimate the rows and prefer a scan of the whole table to the index.
    counts: dict[str, list[int]] = {}
    for queryset in (failed, retrying.exclude(last_error="")):
        for pk, error in queryset.values_list("id", "last_error")[:ERROR_SAMPLE]:
            if not error:
                continue
            entry = counts.setdefault(error[:200], [0, pk])
            entry[0] += 1
            entry[1] = min(entry[1], pk)
    ranked = sorted(counts.items(), key=lambda item: -item[1][0])[:limit]
    return [
        {"error": mask_secrets(error), "count": n, "sample_id": sample}
        for error, (n, sample) in ranked
    ]


def withheld(using: str = "default", now: datetime | None = None) -> list[dict]:
    """Track events not written for want of consent, per event: counts of the last hour, day
    and week (the windows of :data:`WINDOWS`), most withheld first. Summed from
    :class:`~django_cdp.models.WithheldCount` by hour (its index), never from messages."""
    now = now or timezone.now()
    widest = max(span for _, span in WINDOWS)
    rows = (
        WithheldCount.objects.using(using)
        .filter(hour__gte=count_hour(now - widest))
        .values("hour", "event")
        .annotate(total=Sum("n"))
        .order_by()
    )
    events: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = events.setdefault(row["event"], {name: 0 for name, _ in WINDOWS})
        for name, span in WINDOWS:
            if row["hour"] >= count_hour(now - span):
                counts[name] += row["total"]
    ranked = sorted(events.items(), key=lambda item: (-item[1]["week"], item[0]))
    return [{"event": event, **counts} for event, counts in ranked]


def hourly(
    using: str = "default", now: datetime | None = None, buckets: Buckets | None = None
) -> list[dict]:
    """Messages per hour by status over the last 24 hours, oldest hour first, gaps filled."""
    now = now or timezone.now()
    start = count_hour(now) - timedelta(hours=23)
    hours = _per_hour(using, start) if buckets is None else buckets
    out = []
    for i in range(24):
        hour = start + timedelta(hours=i)
        counts = hours.get(hour, {})
        local = timezone.localtime(hour).replace(tzinfo=None)
        out.append({"hour": local, **{s: counts.get(s, 0) for s in CHART_STATUSES}})
    return out


CHART_COLORS = {
    "sent": "#3a8a3a",
    "pending": "#c9a227",
    "failed": "#c0392b",
    "blocked": "#7f4fa0",
    "skipped": "#999999",
    "superseded": "#6c8ebf",
}


def hourly_svg(hours: list[dict]) -> str:
    """A stacked bar chart as inline SVG: no JavaScript, no CDN, works offline."""
    width, height, pad_left, pad_bottom, top = 720, 220, 40, 24, 10
    plot_h = height - pad_bottom - top
    bar_w = (width - pad_left) / max(len(hours), 1)
    peak = max((sum(h[s] for s in CHART_STATUSES) for h in hours), default=0) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="cdp-hourly-chart" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        "<title>Messages per hour by status, last 24 hours</title>",
        f'<text x="2" y="{top + 8}" font-size="10">{peak}</text>',
        f'<text x="2" y="{height - pad_bottom}" font-size="10">0</text>',
        f'<line x1="{pad_left}" y1="{height - pad_bottom}" x2="{width}" '
        f'y2="{height - pad_bottom}" stroke="#888"/>',
    ]
    for i, h in enumerate(hours):
        x = pad_left + i * bar_w
        y = height - pad_bottom
        for s in CHART_STATUSES:
            if not h[s]:
                continue
            bh = h[s] / peak * plot_h
            y -= bh
            parts.append(
                f'<rect class="bar-{s}" x="{x + 1:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" '
                f'height="{bh:.1f}" fill="{CHART_COLORS[s]}">'
                f"<title>{h['hour']:%H}:00 {s}: {h[s]}</title></rect>"
            )
        if i % 3 == 0:
            parts.append(
                f'<text x="{x + 1:.1f}" y="{height - 8}" font-size="10">{h["hour"]:%H}:00</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def report(
    using: str = "default",
    *,
    stuck_after: timedelta = STUCK_AFTER,
    max_failure_rate: float = MAX_FAILURE_RATE,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Everything the health page and ``cdp_health`` show, plus the verdict."""
    now = now or timezone.now()
    status = delivery_status(using, stuck_after=stuck_after, now=now)
    outage = data_plane_outage(using)
    if outage:
        status.ok = False
        status.reasons.append(outage)
    buckets = week_buckets(using, now)
    windows = window_counts(using, now, buckets)
    hour = windows["hour"]
    finished = hour["sent"] + hour["failed"]
    failure_rate = hour["failed"] / finished if finished else 0.0
    if failure_rate > max_failure_rate:
        status.ok = False
        status.reasons.append(
            f"{failure_rate:.0%} of the last hour's finished messages failed "
            f"(threshold {max_failure_rate:.0%})"
        )
    return {
        "status": status,
        "windows": windows,
        "hours": hourly(using, now, buckets),
        "failure_rate": failure_rate,
        "delays": delays(using, now),
        "errors": top_errors(using, now),
        "withheld": withheld(using, now),
        "deferred": status.deferred,
        "now": now,
    }
