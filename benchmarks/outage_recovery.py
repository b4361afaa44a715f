"""Outage drill: how long after a data plane recovers is the backlog of its outage delivered?

Run from the repository root, with PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379::

    .venv/bin/python benchmarks/outage_recovery.py          # 3 min of 503 at 100 writes/s
    .venv/bin/python benchmarks/outage_recovery.py --outage-seconds 20 --rate 50

What it does, with default delivery settings (``RETRY_BACKOFF_BASE`` 10 s, ...):

* a loopback data plane (``DataPlaneServer``, checking auth and every message like
  rudder-server) in this process, answering ``503`` to every request while it is
  "down";
* real ``celery worker -P solo`` processes (``--workers``, default 1) delivering;
* ``Payout`` rows created through the ORM at ``--rate`` per second, one
  transaction each, tracked by django-cdp and kicked after commit, before, during
  and after the outage;
* when the data plane comes back, the outbox's messages written so far are the
  backlog; the drill prints how many seconds after the recovery the last of them
  arrived, and checks that none was dead-lettered.

It creates its own database (``cdp_bench_outage``, dropped at the end) and uses
Redis database 14. Results go to ``docs/benchmarks.md`` under "Outage recovery".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402
from benchmarks.delivery_throughput import (  # noqa: E402
    WRITE_KEY,
    Workers,
    setup_delivery,
)
from django_cdp.devserver import DataPlaneServer  # noqa: E402

DB_NAME = "cdp_bench_outage"
QUEUE = "cdp-bench-outage"


class OutageDataPlane(DataPlaneServer):
    """A loopback data plane that answers ``503`` to every request while ``down`` is set."""

    def __init__(self, write_key: str = WRITE_KEY, **kwargs: Any) -> None:
        super().__init__(write_key=write_key, **kwargs)
        self.down = threading.Event()
        self.refused = 0

    def handle_post(self, handler: Any) -> None:
        if not self.down.is_set():
            super().handle_post(handler)
            return
        handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        with self.lock:
            self.refused += 1
        handler._answer(503, "Service Unavailable")


class Writer(threading.Thread):
    """Creates ``Payout`` rows at a steady rate, one transaction each, until stopped."""

    def __init__(self, rate: float) -> None:
        super().__init__(daemon=True)
        self.rate = rate
        self.stopping = threading.Event()
        self.written = 0

    def run(self) -> None:
        from django.db import connection, transaction

        from example_project.payouts.models import Payout
        from example_project.shops.models import Shop

        try:
            shops = [
                Shop.objects.get_or_create(domain=f"drill{i}.example", email=f"d{i}@example.com")[0]
                for i in range(20)
            ]
            start = time.monotonic()
            while not self.stopping.is_set():
                delay = start + self.written / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                with transaction.atomic():
                    Payout.objects.create(
                        shop=shops[self.written % len(shops)],
                        amount=Decimal("10.00"),
                        currency="EUR",
                    )
                self.written += 1
        finally:
            connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-seconds", type=float, default=180.0)
    parser.add_argument("--rate", type=float, default=100.0, help="writes per second")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    args = parser.parse_args()

    plane = OutageDataPlane().start()
    env = setup_delivery(plane.url, DB_NAME, QUEUE)
    from benchmarks.delivery_celery import app

    app.set_default()  # the writer's thread kicks through it too
    logdir = Path(tempfile.mkdtemp(prefix="cdp-drill-"))
    try:
        with _common.bench_database():
            print(f"# {_common.machine()}; git {_common.git_revision()}", flush=True)
            recovery, backlog, figures = drill(args, plane, env, logdir)
            print(f"# load average {_common.load_average()}", flush=True)
    finally:
        plane.stop()
    print()
    print(
        f"{args.outage_seconds:.0f} s of 503 at {args.rate:.0f} writes/s, "
        f"{args.workers} worker(s), default delivery settings:\n"
    )
    rows = [[f"{backlog:,}", f"{recovery:.1f}", *figures]]
    headers = ["backlog at recovery", "recovery s", "503 answers", "failed", "max attempts"]
    print(_common.table(headers, rows))


def drill(
    args: argparse.Namespace, plane: OutageDataPlane, env: dict[str, str], logdir: Path
) -> tuple[float, int, list[str]]:
    """Warm up, fail for ``--outage-seconds``, recover; seconds until the backlog arrived."""
    from django.db.models import Max

    from django_cdp.models import Message

    pool = Workers(args.workers, QUEUE, env, logdir)
    writer = Writer(args.rate)
    try:
        writer.start()
        time.sleep(args.warmup_seconds)
        plane.down.set()
        print(f"data plane down for {args.outage_seconds:.0f} s", flush=True)
        time.sleep(args.outage_seconds)
        last = Message.objects.aggregate(Max("id"))["id__max"] or 0
        plane.down.clear()
        recovered = time.monotonic()
        backlog = Message.objects.filter(id__lte=last)
        print(f"data plane back; backlog of {backlog.count():,} messages", flush=True)
        # Delivered = not pending any more (sent; an identify may be superseded by a newer one).
        while backlog.filter(status="pending").exists():
            if time.monotonic() - recovered > args.timeout:
                raise TimeoutError("the backlog was not delivered")
            time.sleep(0.1)
        recovery = time.monotonic() - recovered
        sent = set(backlog.filter(status="sent").values_list("message_id", flat=True))
        assert sent <= set(plane.message_ids()), "a message marked sent never arrived"
    finally:
        writer.stopping.set()
        writer.join(10)
        pool.stop()
    failed = Message.objects.filter(status="failed").count()
    attempts = Message.objects.aggregate(Max("attempts"))["attempts__max"]
    return recovery, backlog.count(), [str(plane.refused), str(failed), str(attempts)]


if __name__ == "__main__":
    main()
