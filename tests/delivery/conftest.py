"""Fixtures for the delivery tests: a loopback data plane, outbox rows, real workers, Redis.

Worker processes need a committed database that they can reach. On SQLite the
suite's in-memory test database is therefore switched to a file here (at
import, before pytest-django creates it), in WAL mode with a busy timeout, so
that a worker and the test can both use it. Tests with workers use
``transactional_db``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from django_cdp import payloads
from django_cdp.devserver import DataPlaneServer
from django_cdp.models import Message

REPO = Path(__file__).resolve().parents[2]
WRITE_KEY = "test-write-key"
BROKER_URL = os.environ.get("CDP_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")


def _use_sqlite_file() -> None:
    db = connections.settings["default"]
    if not db["ENGINE"].endswith("sqlite3") or db["TEST"].get("NAME"):
        return
    path = Path(tempfile.gettempdir()) / f"django-cdp-tests-{os.getpid()}.sqlite3"
    db["TEST"]["NAME"] = str(path)
    db["OPTIONS"] = {
        **db.get("OPTIONS", {}),
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL",
    }


_use_sqlite_file()


# --- the data plane --------------------------------------------------------------------------


@pytest.fixture
def data_plane() -> Iterator[DataPlaneServer]:
    server = DataPlaneServer(write_key=WRITE_KEY).start()
    yield server
    server.stop()


def cdp_config(data_plane: DataPlaneServer | None = None, **overrides: Any) -> dict[str, Any]:
    """``DJANGO_CDP`` for delivery tests: the suite's plan plus a data plane and short delays."""
    from django.conf import settings

    config = {
        **settings.DJANGO_CDP,
        "WRITE_KEY": WRITE_KEY,
        "DATA_PLANE_URL": data_plane.url if data_plane else "",
        "DELIVERY": "manual",
        "CONNECT_TIMEOUT": 2.0,
        "READ_TIMEOUT": 5.0,
        "RETRY_BACKOFF_BASE": 0.2,
        "RETRY_BACKOFF_MAX": 2.0,
        "CONFIG_ERROR_RETRY_SECONDS": 0.5,
    }
    config.update(overrides)
    return config


@pytest.fixture
def configure(settings, data_plane) -> Callable[..., dict[str, Any]]:
    """Apply ``cdp_config(data_plane, **overrides)`` to the test process's settings."""

    def apply(**overrides: Any) -> dict[str, Any]:
        settings.DJANGO_CDP = cdp_config(data_plane, **overrides)
        return settings.DJANGO_CDP

    apply()
    return apply


# --- outbox rows -----------------------------------------------------------------------------


def make_messages(
    n: int,
    *,
    using: str = "default",
    kind: str = "track",
    users: int = 50,
    missing_user: tuple[int, ...] = (),
    extra: dict[str, Any] | None = None,
) -> list[Message]:
    """Write ``n`` realistic messages straight into the outbox (as the tracking core would).

    Indexes in ``missing_user`` get no ``userId`` (a message the gateway refuses).
    """
    rows = []
    for i in range(n):
        user_id = str(i % users + 1)
        if kind == "identify":
            message = payloads.identify_message(
                user_id, {"domain": f"shop{user_id}.example", "email": f"m{user_id}@example.com"}
            )
            event = ""
        else:
            event = "Payout Created"
            message = payloads.track_message(
                event,
                user_id,
                {"id": i, "amount": Decimal("125.50"), "currency": "EUR", "status": "pending"},
            )
        message.update(extra or {})
        if i in missing_user:
            del message["userId"]
        rows.append(
            Message(
                message_id=message["messageId"],
                type=kind,
                event=event,
                user_id=user_id,
                payload=payloads.encode(message),
                source_model="payouts.payout",
                source_pk=str(i),
            )
        )
    return Message.objects.using(using).bulk_create(rows, batch_size=2000)


def statuses(using: str = "default") -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in Message.objects.using(using).values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --- Redis and workers -----------------------------------------------------------------------


def redis_answers() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(BROKER_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture
def redis_broker() -> str:
    """The broker URL; skips (fails under ``CI=true``) when Redis is not answering."""
    if not redis_answers():
        message = f"Redis is not answering at {BROKER_URL}; start redis-server to run this test"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    import redis

    redis.Redis.from_url(BROKER_URL).flushdb()
    return BROKER_URL


class Worker:
    """A ``celery worker`` subprocess (with embedded beat when ``sweep`` is set)."""

    def __init__(self, name: str, log: Path, proc: subprocess.Popen) -> None:
        self.name = name
        self.log = log
        self.proc = proc

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not wait_until(
            lambda: " ready." in self.output() or self.proc.poll() is not None, timeout
        ):
            raise RuntimeError(f"worker {self.name} not ready:\n{self.output()[-3000:]}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited:\n{self.output()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture
def queue_name() -> str:
    """A queue of this test's own, so that no kick left by another test reaches its workers."""
    return f"cdp-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start_worker(
    transactional_db, redis_broker, tmp_path, queue_name
) -> Iterator[Callable[..., Worker]]:
    """Start real worker processes on this test's database, queue and data plane."""
    workers: list[Worker] = []

    def start(
        cdp: dict[str, Any],
        *,
        sweep: float = 0.0,
        name: str | None = None,
        app: str = "tests.delivery.celery_app",
    ) -> Worker:
        name = name or f"w{len(workers) + 1}"
        db = connections["default"].settings_dict
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "DJANGO_SETTINGS_MODULE": "tests.delivery.settings_worker",
            "CDP_WORKER_DB_NAME": str(db["NAME"]),
            "CDP_WORKER_CDP": json.dumps({**cdp, "QUEUE": queue_name}, default=str),
            "CDP_WORKER_SWEEP": str(sweep),
            "CDP_TEST_BROKER_URL": redis_broker,
        }
        log = tmp_path / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-P",
            "solo",
            "-Q",
            queue_name,
            "-n",
            f"{name}-{queue_name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if sweep:
            # The in-memory scheduler: the default PersistentScheduler keeps a shelve file, which
            # on Python 3.13 (dbm.sqlite3) fails with "locking protocol" inside a worker's -B.
            cmd += ["-B", "--scheduler", "celery.beat:Scheduler"]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = Worker(name, log, proc)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.kill()


@pytest.fixture
def celery_app_for_kicks(redis_broker):
    """The tests' Celery app, current in this process, so that kicks publish to Redis."""
    from tests.delivery.celery_app import app

    app.set_current()
    app.set_default()
    return app
