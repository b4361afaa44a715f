"""``manage.py cdp_backfill_identify``: identify every existing customer once.

Run it once when adopting django-cdp on an existing database (and again after
an interruption: rows already identified with their current traits are
skipped). The work is in :mod:`django_cdp.backfill`; this command parses the
selection, shows progress, prints the summary and sets the exit code.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from django.core.exceptions import FieldDoesNotExist, FieldError, ValidationError
from django.core.management.base import CommandError, CommandParser
from django.utils.dateparse import parse_date, parse_datetime

from django_cdp import backfill
from django_cdp.management.base import CdpCommand, positive_int
from django_cdp.registry import registry
from django_cdp.settings import cdp_settings


class Progress:
    """Progress of one phase: one updating line on a terminal, periodic plain lines otherwise."""

    def __init__(
        self, out: Any, label: str, total: int, *, tty: bool, interval: float | None = None
    ) -> None:
        self.out = out
        self.label = label
        self.total = total
        self.tty = tty
        self.interval = interval if interval is not None else (0.2 if tty else 10.0)
        self.started = time.monotonic()
        self.last = self.started
        self.done = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}/{self.total:,}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:,.0f}/s"
        if rate > 0 and self.total > self.done:
            text += f", ETA {datetime.timedelta(seconds=round((self.total - self.done) / rate))}"
        return text

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        self._show()

    def _show(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K" + self.line(), ending="")
            self.out.flush()
        else:
            self.out.write(self.line())

    def finish(self) -> None:
        self._show()
        if self.tty:
            self.out.write("")


class Command(CdpCommand):
    database_help = "Database alias of the identity rows and the outbox (default: default)."
    help = (
        "Identify every existing row of the identity model (or a selection) with its current "
        "traits, skipping rows whose traits equal the last identify recorded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--pk",
            action="append",
            default=[],
            metavar="PK",
            help="Only these primary keys (repeat the option or give a comma-separated list).",
        )
        parser.add_argument(
            "--since",
            metavar="DATE",
            help="Only rows whose --date-field is on or after DATE (YYYY-MM-DD or ISO datetime).",
        )
        parser.add_argument(
            "--date-field",
            metavar="FIELD",
            help="The date field --since compares, and the preferred timestamp field of "
            "--track-created events.",
        )
        parser.add_argument(
            "--filter",
            action="append",
            default=[],
            metavar="LOOKUP=VALUE",
            help="Only rows matching this ORM lookup, e.g. plan__name=Growth (repeatable; all "
            "must match).",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=500,
            help="Rows per query and per transaction.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count and print one sample payload; write nothing.",
        )
        parser.add_argument(
            "--force", action="store_true", help="Identify rows whose traits are unchanged too."
        )
        parser.add_argument(
            "--deliver",
            action="store_true",
            help="Drain the outbox in the foreground afterwards (as manage.py cdp_deliver).",
        )
        parser.add_argument(
            "--track-created",
            action="store_true",
            help="Also queue the historical '<Object> Created' events of registered models owned "
            "by the selected rows, dated from their creation field.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        identity = registry.identity
        if identity is None:
            raise CommandError("DJANGO_CDP['IDENTITY'] is not configured; run manage.py check.")
        if not cdp_settings.ENABLED:
            raise CommandError("DJANGO_CDP['ENABLED'] is False: django-cdp records nothing.")
        if options["since"] and not options["date_field"]:
            raise CommandError("--since needs --date-field (the field to compare).")
        if options["dry_run"] and options["deliver"]:
            raise CommandError("--dry-run writes nothing, so there is nothing to --deliver.")
        using: str = options["database"]
        self.tty = self.stdout.isatty()

        pks = [p.strip() for value in options["pk"] for p in value.split(",") if p.strip()]
        filters = []
        for item in options["filter"]:
            lookup, sep, value = item.partition("=")
            if not sep or not lookup:
                raise CommandError(f"--filter {item!r}: expected LOOKUP=VALUE.")
            filters.append((lookup.strip(), value))
        since = self._parse_since(options["since"]) if options["since"] else None
        selected = bool(pks or since or filters)
        try:
            queryset = backfill.identity_queryset(
                using,
                pks=pks or None,
                since=since,
                date_field=options["date_field"],
                filters=filters,
            )
            total = queryset.count()
        except (FieldDoesNotExist, FieldError, ValueError, ValidationError) as exc:
            raise CommandError(f"Invalid selection: {exc}") from exc

        kwargs = {
            "using": using,
            "batch_size": options["batch_size"],
            "dry_run": options["dry_run"],
        }
        results = []
        try:
            progress = Progress(self.stdout, "identify", total, tty=self.tty)
            results.append(
                backfill.backfill_identify(
                    queryset,
                    force=options["force"],
                    total=total,
                    on_error=self._on_error("identify"),
                    on_progress=progress.update,
                    **kwargs,
                )
            )
            progress.finish()
            if options["track_created"]:
                owners = queryset if selected else None
                for config in backfill.created_configs():
                    field = backfill.created_field(config.model, options["date_field"])
                    if field is None:
                        self.stderr.write(
                            f"{config.label}: no creation date field "
                            f"({', '.join(backfill.CREATED_FIELDS)}); its Created events are not "
                            "backfilled. Name one with --date-field."
                        )
                        continue
                    objects = backfill.created_queryset(config, owners, using)
                    event = config.event_name("created")
                    progress = Progress(self.stdout, event, objects.count(), tty=self.tty)
                    results.append(
                        backfill.backfill_created(
                            config,
                            objects,
                            timestamp_field=field,
                            total=progress.total,
                            on_error=self._on_error(event),
                            on_progress=progress.update,
                            **kwargs,
                        )
                    )
                    progress.finish()
        except KeyboardInterrupt:
            self.stdout.write("")
            self._summary(results, options["dry_run"])
            raise CommandError(
                "Interrupted. Every finished batch is committed: run the command again to "
                "continue (unchanged rows are skipped).",
                returncode=130,
            ) from None

        self._summary(results, options["dry_run"])
        if options["deliver"]:
            from django_cdp.delivery import drain

            self.stdout.write(f"deliver: {drain(using=using)}")
        errors = sum(r.errors for r in results)
        unsendable = sum(r.unsendable for r in results)
        if errors or unsendable:
            raise CommandError(
                f"{errors} row(s) could not be read and {unsendable} message(s) cannot be sent; "
                "see the lines above for their pks.",
                returncode=1,
            )

    def _parse_since(self, text: str) -> datetime.date:
        try:
            value = parse_datetime(text) or parse_date(text)
        except ValueError:
            value = None
        if value is None:
            raise CommandError(f"--since {text!r}: expected YYYY-MM-DD or an ISO datetime.")
        return value

    def _on_error(self, phase: str):
        def report(pk: Any, text: str) -> None:
            if self.tty:
                self.stderr.write("\r\x1b[2K", ending="")
            self.stderr.write(f"{phase}: pk={pk!r}: {text}")

        return report

    def _summary(self, results: list[backfill.BackfillResult], dry_run: bool) -> None:
        verb = "would queue" if dry_run else "queued"
        for r in results:
            skipped = "unchanged" if r.phase == "identify" else "already in the outbox"
            line = (
                f"{r.phase}: {r.queued} {verb}, {r.unchanged} skipped ({skipped}), "
                f"{r.errors} error(s)"
            )
            if r.unsendable:
                line += f", {r.unsendable} stored as failed or blocked (not sendable)"
            if r.gone:
                line += f", {r.gone} deleted during the run"
            if r.withheld:
                line += f", {r.withheld} without consent (skipped)"
            self.stdout.write(line)
        if dry_run:
            sample = next((r.sample for r in results if r.sample), None)
            self.stdout.write("Dry run: nothing was written.")
            if sample:
                self.stdout.write("Sample payload:")
                self.stdout.write(sample)
            else:
                self.stdout.write("No message would be queued.")
