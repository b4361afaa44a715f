"""``manage.py cdp_health``: the delivery health figures, with an exit code for cron.

Exit codes: 0 when delivery is healthy; 1 when it is stuck (the oldest pending
message is older than ``--max-pending-age``, the data plane refuses the write
key or URL, or more than ``--max-failure-rate`` of the last hour's finished
messages failed). The figures are the admin health page's (``django_cdp.health``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import CommandParser

from django_cdp import health
from django_cdp.management.base import CdpCommand, fraction, seconds


class Command(CdpCommand):
    help = "Print django-cdp delivery health; exit 1 when delivery is stuck or failing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-pending-age",
            type=seconds,
            default=health.STUCK_AFTER,
            help="Seconds the oldest pending message may wait "
            f"(default {health.STUCK_AFTER.total_seconds():g}).",
        )
        parser.add_argument(
            "--max-failure-rate",
            type=fraction,
            default=health.MAX_FAILURE_RATE,
            help="Largest acceptable share of failed messages in the last hour "
            "(default %(default)s).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")

    def handle(self, *args: Any, **options: Any) -> None:
        figures = health.report(
            options["database"],
            stuck_after=options["max_pending_age"],
            max_failure_rate=options["max_failure_rate"],
        )
        status: health.Status = figures["status"]
        if options["json"]:
            self.stdout.write(json.dumps(_as_json(figures), indent=2))
        else:
            self._text(figures)
        if not status.ok:
            sys.exit(1)

    def _text(self, figures: dict[str, Any]) -> None:
        status: health.Status = figures["status"]
        out = self.stdout.write
        out(("OK: " if status.ok else "STUCK: ") + status.message)
        out(f"{'window':<8}{'written':>10}{'sent':>10}{'pending':>10}{'failed':>10}")
        for name, row in figures["windows"].items():
            out(
                f"{name:<8}{row['written']:>10}{row['sent']:>10}"
                f"{row['pending']:>10}{row['failed']:>10}"
            )
        oldest = status.oldest_pending_at or "none"
        out(f"oldest pending: {oldest} ({status.oldest_pending_age_text})")
        waiting = figures["deferred"]
        if waiting["statements"]:
            out(
                f"deferred statements: {waiting['statements']} ({waiting['rows']} rows) wait to "
                f"become messages, the oldest since {waiting['oldest']}"
            )
        d = figures["delays"]
        p50 = f"{d['p50']:.2f} s" if d["p50"] is not None else "-"
        p95 = f"{d['p95']:.2f} s" if d["p95"] is not None else "-"
        out(f"write to sent: p50 {p50}, p95 {p95} (over {d['n']} messages)")
        out(f"failure rate, last hour: {figures['failure_rate']:.1%}")
        for e in figures["errors"]:
            out(f"error x{e['count']} (e.g. message {e['sample_id']}): {e['error']}")
        for w in figures["withheld"]:
            out(
                f"withheld (no consent): {w['event']}: {w['hour']} last hour, "
                f"{w['day']} last day, {w['week']} last week"
            )


def _as_json(figures: dict[str, Any]) -> dict[str, Any]:
    status: health.Status = figures["status"]
    return {
        "ok": status.ok,
        "reasons": status.reasons,
        "oldest_pending_at": status.oldest_pending_at.isoformat()
        if status.oldest_pending_at
        else None,
        "oldest_pending_seconds": status.oldest_pending_age.total_seconds()
        if status.oldest_pending_age is not None
        else None,
        "windows": figures["windows"],
        "failure_rate": figures["failure_rate"],
        "delays": figures["delays"],
        "errors": figures["errors"],
        "withheld": figures["withheld"],
        "deferred": {
            **figures["deferred"],
            "oldest": figures["deferred"]["oldest"].isoformat()
            if figures["deferred"]["oldest"]
            else None,
        },
    }
