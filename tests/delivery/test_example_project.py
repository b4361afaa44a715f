"""Issue 3's acceptance on the example project itself: its own Celery worker delivers what
its own code writes, to the data plane named by RUDDERSTACK_DATA_PLANE_URL."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.delivery.conftest import REPO, WRITE_KEY, Worker, wait_until

pytestmark = pytest.mark.redis

SEEDED = 23  # what seed_demo writes on an empty database (tracks and identifies)


def _manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "example_project/manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _statuses(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as db:
        return dict(db.execute("SELECT status, COUNT(*) FROM django_cdp_message GROUP BY status"))


def test_example_project_worker_delivers_the_demo_data(redis_broker, data_plane, tmp_path):
    database = tmp_path / "example.sqlite3"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{database}",
        "CELERY_BROKER_URL": redis_broker,
        "RUDDERSTACK_WRITE_KEY": WRITE_KEY,
        "RUDDERSTACK_DATA_PLANE_URL": data_plane.url,
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)  # manage.py and the worker use the example's
    _manage(env, "migrate", "--verbosity", "0")
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "example_project",
                "worker",
                "-P",
                "solo",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker("example", log, proc)
    try:
        worker.wait_ready()
        _manage(env, "seed_demo")  # each committed step kicks the worker
        # An identify still waiting when a newer one of its user arrives is superseded.
        assert wait_until(lambda: "pending" not in _statuses(database), 60), worker.output()
    finally:
        worker.kill()
    statuses = _statuses(database)
    assert statuses["sent"] + statuses.get("superseded", 0) == SEEDED, statuses
    with sqlite3.connect(database) as db:
        sent = {
            r[0]
            for r in db.execute("SELECT message_id FROM django_cdp_message WHERE status = 'sent'")
        }
    assert sorted(data_plane.message_ids()) == sorted(sent)  # each once, same messageId
    events = {m.get("event") for m in data_plane.messages}
    assert {"Shop Created", "Payout Created", "Shop Updated"} <= events
