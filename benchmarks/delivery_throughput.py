"""Delivery throughput and latency of django-cdp next to rudder-sdk-python (issue 3's acceptance).

Run from the repository root, with PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379::

    .venv/bin/python benchmarks/delivery_throughput.py            # 100,000 messages, ~2 minutes
    .venv/bin/python benchmarks/delivery_throughput.py --messages 20000 --latency-seconds 5

In one run, against one loopback data plane (``django_cdp.devserver.DataPlaneServer``
in its own process, checking auth and every message like rudder-server, gzip on):

* **django-cdp, 1 and 2 workers**: a backlog of N outbox rows (realistic
  ``Payout Created`` track messages as the trigger engine writes them, or with
  ``--engine signals`` as the signal engine does; written before the clock starts) drained by
  real ``celery worker -P solo`` processes with default settings (batches of at
  most 500 KB / 2,500 messages, gzip, claim/send/fenced write-back, synchronous
  commits). Timed from publishing the ``deliver`` tasks to the last message
  arriving at the data plane.
* **rudder-sdk-python**: the same N events through ``Client.track()`` (defaults,
  ``max_queue_size`` above N so it drops nothing), timed from the first call to
  the last arrival. Its queue is in memory: nothing of it survives a crash.
* **latency**: one worker, ``Payout`` rows created through the ORM at 200 per
  second (one transaction each, tracked by django-cdp, kick after commit with the
  default ``KICK_DEBOUNCE_SECONDS``); delay from each commit to its message's
  arrival.

It creates its own database (``cdp_bench_delivery``, dropped at the end) and uses
Redis database 14. Results go to ``docs/benchmarks.md`` under "Delivery throughput".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
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
from django_cdp.devserver import DataPlaneServer  # noqa: E402

WRITE_KEY = "bench-write-key"
DB_NAME = "cdp_bench_delivery"
BROKER_URL = "redis://127.0.0.1:6379/14"
QUEUE = "cdp-bench"
USERS = 1000


# --- the data plane, in a process of its own ------------------------------------------------


class _Recorder(DataPlaneServer):
    """Counts arrivals and keeps (messageId, properties.id, arrival time) instead of messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count = 0
        self.last_at = 0.0
        self.arrivals: list[tuple[str, Any, float]] = []

    def received(self, items: list[dict[str, Any]]) -> None:
        now = time.time()
        with self.lock:
            self.messages.clear()  # keep memory flat; counts and arrivals are enough
            self.count += len(items)
            self.last_at = now
            self.arrivals.extend(
                (m.get("messageId"), (m.get("properties") or {}).get("id"), now) for m in items
            )


def _serve(conn: Any, port: int) -> None:
    server = _Recorder("127.0.0.1", port, write_key=WRITE_KEY)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn.send("ready")
    while True:
        command = conn.recv()
        with server.lock:
            if command == "count":
                conn.send((server.count, server.last_at))
            elif command == "arrivals":
                conn.send(list(server.arrivals))
            elif command == "reset":
                server.count, server.last_at = 0, 0.0
                server.arrivals.clear()
                server.requests.clear()
                conn.send("ok")
            else:
                conn.send("bye")
                return


class DataPlane:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.port), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"
        self.url = f"http://127.0.0.1:{self.port}"

    def ask(self, command: str) -> Any:
        self.conn.send(command)
        return self.conn.recv()

    def wait_for(self, n: int, timeout: float) -> float:
        """Wall time of the arrival that made the count reach ``n``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count, last_at = self.ask("count")
            if count >= n:
                return last_at
            time.sleep(0.01)
        raise TimeoutError(f"data plane got {self.ask('count')[0]} of {n} messages")

    def close(self) -> None:
        self.ask("stop")
        self.proc.join(5)


# --- workers --------------------------------------------------------------------------------


class Workers:
    def __init__(self, n: int, queue: str, env: dict[str, str], logdir: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        for i in range(n):
            log = logdir / f"worker-{time.monotonic_ns()}-{i}.log"
            cmd = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.delivery_celery",
                "worker",
                "-P",
                "solo",
                "-Q",
                queue,
                "-n",
                f"bench{i}-{os.getpid()}-{time.monotonic_ns()}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs.append(proc)
            self.logs.append(log)
        deadline = time.monotonic() + 60
        while not all(" ready." in log.read_text(errors="replace") for log in self.logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                tail = "\n".join(log.read_text(errors="replace")[-2000:] for log in self.logs)
                raise RuntimeError(f"workers did not start:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


# --- the runs -------------------------------------------------------------------------------


def properties(i: int) -> dict[str, Any]:
    return {"id": i, "amount": Decimal("125.50"), "currency": "EUR", "status": "pending"}


#: What the trigger engine remembers about a created Payout (``Message.capture``).
CURRENT = {"amount": 125.5, "currency": "EUR", "status": "pending"}


def write_backlog(n: int, engine: str = "triggers") -> None:
    """N ``Payout Created`` rows as ``engine`` writes them: the trigger engine (PostgreSQL's
    default) leaves its transaction's id and what it remembers (``xid``, ``capture``) on
    each row, which the claim then finishes; the signal engine leaves both empty."""
    from django.db import connection

    from django_cdp import payloads
    from django_cdp.models import Message

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE django_cdp_message CASCADE")
    rows = []
    for i in range(n):
        user_id = str(i % USERS + 1)
        message = payloads.track_message("Payout Created", user_id, properties(i))
        rows.append(
            Message(
                message_id=message["messageId"],
                type="track",
                event="Payout Created",
                user_id=user_id,
                payload=payloads.encode(message),
                source_model="payouts.payout",
                source_pk=str(i),
                **(
                    {"xid": 1_000 + i, "capture": {"action": "created", "current": CURRENT}}
                    if engine == "triggers"
                    else {}
                ),
            )
        )
        if len(rows) == 10_000:
            Message.objects.bulk_create(rows)
            rows = []
    Message.objects.bulk_create(rows)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE django_cdp_message")


def run_cdp(
    n: int, workers: int, plane: DataPlane, env: dict[str, str], logdir: Path, engine: str
) -> float:
    from django_cdp.models import Message
    from django_cdp.tasks import deliver

    plane.ask("reset")
    write_backlog(n, engine)
    pool = Workers(workers, QUEUE, env, logdir)
    try:
        started = time.time()
        for _ in range(2 * workers):
            deliver.apply_async(kwargs={"using": "default"})
        finished = plane.wait_for(n, 600)
    finally:
        pool.stop()
    sent = Message.objects.filter(status="sent").count()
    assert sent == n, f"{sent} of {n} marked sent"
    return n / (finished - started)


def run_sdk(n: int, plane: DataPlane) -> float:
    from rudderstack.analytics.client import Client

    plane.ask("reset")
    client = Client(WRITE_KEY, host=plane.url, max_queue_size=n + 1000)
    started = time.time()
    for i in range(n):
        props = {**properties(i), "amount": 125.5}
        client.track(str(i % USERS + 1), "Payout Created", props)
    finished = plane.wait_for(n, 600)
    client.join()
    return n / (finished - started)


def run_latency(
    rate: float,
    seconds: float,
    debounce: float,
    plane: DataPlane,
    env: dict[str, str],
    logdir: Path,
) -> list[float]:
    from django.conf import settings
    from django.db import transaction
    from django.test import override_settings

    from example_project.payouts.models import Payout
    from example_project.shops.models import Shop

    pool = Workers(1, QUEUE, env, logdir)
    kick_settings = override_settings(
        DJANGO_CDP={**settings.DJANGO_CDP, "KICK_DEBOUNCE_SECONDS": debounce}
    )
    kick_settings.enable()
    try:
        shops = [
            Shop.objects.get_or_create(domain=f"latency{i}.example", email=f"m{i}@example.com")[0]
            for i in range(20)
        ]
        time.sleep(2.0)
        plane.ask("reset")
        committed: dict[int, float] = {}
        total = int(rate * seconds)
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with transaction.atomic():
                payout = Payout.objects.create(
                    shop=shops[i % len(shops)], amount=Decimal("10.00"), currency="EUR"
                )
            committed[payout.pk] = time.time()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            arrived = {pid: at for _, pid, at in plane.ask("arrivals") if pid in committed}
            if len(arrived) >= total:
                break
            time.sleep(0.1)
    finally:
        kick_settings.disable()
        pool.stop()
    return sorted(arrived[pk] - committed[pk] for pk in arrived)


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def setup_delivery(url: str, database: str, queue: str) -> dict[str, str]:
    """Set up Django in this process for a delivery benchmark (Celery delivery to the data plane
    at ``url``, the database ``database``, the queue ``queue`` on an emptied Redis database
    :data:`BROKER_URL`); the environment its worker processes need."""
    cdp = {"WRITE_KEY": WRITE_KEY, "DATA_PLANE_URL": url, "DELIVERY": "celery", "QUEUE": queue}
    os.environ["CDP_BENCH_CDP"] = json.dumps(cdp)
    os.environ["CDP_BENCH_DB"] = database
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.delivery_settings"
    import django

    django.setup()
    import redis

    redis.Redis.from_url(BROKER_URL).flushdb()
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CDP_BENCH_DB": database,
        "CDP_BENCH_BROKER_URL": BROKER_URL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument(
        "--engine",
        choices=["triggers", "signals"],
        default="triggers",
        help="which capture engine's rows make the backlog (default: triggers, PostgreSQL's)",
    )
    parser.add_argument("--latency-rate", type=float, default=200.0)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument(
        "--debounce",
        type=float,
        action="append",
        help="KICK_DEBOUNCE_SECONDS of a latency run (repeatable; default: 1.0 and 0.25)",
    )
    args = parser.parse_args()

    plane = DataPlane()  # forked before Django and psycopg are loaded
    env = setup_delivery(plane.url, DB_NAME, QUEUE)
    from benchmarks.delivery_celery import app

    app.set_current()
    logdir = Path(tempfile.mkdtemp(prefix="cdp-bench-"))
    n = args.messages
    try:
        with _common.bench_database():
            print(f"# {_common.machine()}; git {_common.git_revision()}", flush=True)
            sdk = run_sdk(n, plane)
            print(f"rudder-sdk-python: {sdk:,.0f} msg/s", flush=True)
            one = run_cdp(n, 1, plane, env, logdir, args.engine)
            print(f"django-cdp, 1 worker: {one:,.0f} msg/s", flush=True)
            two = run_cdp(n, 2, plane, env, logdir, args.engine)
            print(f"django-cdp, 2 workers: {two:,.0f} msg/s", flush=True)
            latencies = {
                debounce: run_latency(
                    args.latency_rate, args.latency_seconds, debounce, plane, env, logdir
                )
                for debounce in args.debounce or [1.0, 0.25]
            }
    finally:
        plane.close()
    expected = int(args.latency_rate * args.latency_seconds)
    rows = [
        ["rudder-sdk-python 2.1.9 (in-memory queue)", f"{sdk:,.0f}", "1.00"],
        ["django-cdp, 1 worker (durable outbox)", f"{one:,.0f}", f"{one / sdk:.2f}"],
        ["django-cdp, 2 workers", f"{two:,.0f}", f"{two / sdk:.2f}"],
    ]
    print()
    print(f"{n:,} messages to a loopback data plane (gzip on):\n")
    print(_common.table(["sender", "messages/s", "vs SDK"], rows))
    print()
    print(
        f"Commit to arrival at {args.latency_rate:.0f} changes/s for {args.latency_seconds:.0f} s, "
        "1 worker:\n"
    )
    rows = []
    for debounce, delays in latencies.items():
        rows.append(
            [
                f"{debounce:g} s",
                f"{len(delays)}/{expected}",
                f"{percentile(delays, 50) * 1000:.0f}",
                f"{percentile(delays, 95) * 1000:.0f}",
                f"{max(delays) * 1000:.0f}",
            ]
        )
    print(_common.table(["KICK_DEBOUNCE_SECONDS", "arrived", "p50 ms", "p95 ms", "max ms"], rows))


if __name__ == "__main__":
    main()
