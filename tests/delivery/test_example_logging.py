"""The example project's worker prints each django-cdp log line once (issue 10).

A handler on the ``django_cdp`` logger plus the one Celery's worker puts on the
root logger printed every line twice; the example's LOGGING now relies on the
root handler alone, which the worker replaces with its own.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.delivery.conftest import REPO, Worker

pytestmark = pytest.mark.redis

#: Logged by django_cdp.worker.Consumer each time the worker connects to the broker.
LINE = "django-cdp: connected to the broker; queued a sweep of the outbox"


def test_example_worker_prints_each_django_cdp_line_once(redis_broker, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'example.sqlite3'}",
        "CELERY_BROKER_URL": redis_broker,
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the example's own settings
    migrate = [sys.executable, "example_project/manage.py", "migrate", "--verbosity", "0"]
    subprocess.run(migrate, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "example_project", "worker", "-P", "solo"]
    cmd += ["--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = Worker("example", log, proc)
    try:
        worker.wait_ready()  # " ready." is logged after the connection's line
    finally:
        worker.stop()
    assert worker.output().count(LINE) == 1, worker.output()[-3000:]
