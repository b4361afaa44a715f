"""``manage.py cdp_triggers``: the capture triggers of one database, shown, installed or removed.

* ``cdp_triggers``: per registered model, the engine that captures it (and why),
  and whether its triggers are installed and current.
* ``cdp_triggers --check``: the same, exit code 1 when a model captured by triggers
  has them missing or outdated (after a settings change without ``migrate``).
* ``cdp_triggers install``: install or update them now (``migrate`` does it too).
* ``cdp_triggers uninstall``: remove every django-cdp trigger and function.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_cdp.capture import triggers
from django_cdp.management.base import CdpCommand


class Command(CdpCommand):
    help = "Show, install or remove django-cdp's capture triggers (PostgreSQL)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "action",
            nargs="?",
            choices=("status", "install", "uninstall"),
            default="status",
            help="status (default), install or uninstall.",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="Exit 1 when a model captured by triggers has them missing or outdated.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        action = options["action"]
        if action != "status" and options["check"]:
            raise CommandError(f"--check goes with the status, not with {action!r}")
        if action == "install":
            self._changes(triggers.install(using, force=True), "nothing to install")
        elif action == "uninstall":
            self._changes(triggers.uninstall(using), "no django-cdp triggers were installed")
        rows = triggers.status(using)
        self._table(rows)
        broken = [row for row in rows if not row.ok]
        if options["check"] and broken:
            names = ", ".join(f"{row.label} ({row.state})" for row in broken)
            raise CommandError(
                f"capture triggers missing or outdated on {using!r}: {names}; "
                "run `manage.py migrate` or `manage.py cdp_triggers install`",
                returncode=1,
            )

    def _changes(self, changes: list[str], nothing: str) -> None:
        for change in changes or [nothing]:
            self.stdout.write(change)

    def _table(self, rows: list[triggers.Status]) -> None:
        width = max([len(row.label) for row in rows] + [len("model")])
        self.stdout.write(f"{'model':<{width}}  {'engine':<8}  {'triggers':<20}  why")
        for row in rows:
            self.stdout.write(
                f"{row.label:<{width}}  {row.engine:<8}  {row.state:<20}  {row.reason}"
            )
