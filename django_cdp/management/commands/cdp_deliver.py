"""``manage.py cdp_deliver``: drain the outbox in the foreground, without Celery.

For cron (``DELIVERY = "manual"``), for development, and for projects without a
broker. ``--loop`` keeps draining every ``--interval`` seconds.

Run by hand it always tries: the first drain sends even while the data plane is
backing off after an outage (a person who runs it wants to know now), later
rounds of ``--loop`` respect the backoff like the workers.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from django.core.management.base import CommandParser

from django_cdp.delivery import DrainResult, drain
from django_cdp.management.base import CdpCommand, positive_float


class Command(CdpCommand):
    help = "Send due django-cdp messages to the data plane (once, or with --loop until stopped)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--loop", action="store_true", help="Keep draining until interrupted.")
        parser.add_argument(
            "--interval",
            type=positive_float,
            default=2.0,
            help="With --loop: seconds to wait when nothing was due (default 2).",
        )
        parser.add_argument(
            "--time-budget",
            type=positive_float,
            default=None,
            help="Stop a drain after this many seconds (default: until nothing is due).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using: str = options["database"]
        if not options["loop"]:
            result = drain(using=using, time_budget=options["time_budget"], force=True)
            self._report(result, always=True)
            return
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        force = True
        try:
            while not stopping:
                result = drain(using=using, time_budget=options["time_budget"] or 60.0, force=force)
                force = False
                self._report(result, always=False)
                if not result.claimed or result.retrying or result.config_errors:
                    # Nothing due, or the data plane is unhappy: wait before the next round.
                    deadline = time.monotonic() + options["interval"]
                    while not stopping and time.monotonic() < deadline:
                        time.sleep(min(0.2, options["interval"]))
        except KeyboardInterrupt:
            pass

    def _report(self, result: DrainResult, *, always: bool) -> None:
        if always or result.claimed:
            self.stdout.write(str(result))
