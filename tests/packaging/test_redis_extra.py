"""``pip install "django-cdp[redis]"`` is enough for a Celery worker on Redis (issue 10).

Installs the wheel (``dists``) with the ``redis`` extra into a new virtualenv
(through pip's own configuration, like a user would) and starts a worker of a
tiny Celery app from there. Without the extra, kombu's Redis transport misses
``redis`` and ``packaging`` and the worker cannot start. It takes about a
minute, so it runs once, in the PostgreSQL pass.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.delivery.conftest import Worker
from tests.packaging.dists import clean_env, venv_with_wheel

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

TINY_APP = """\
import os

from celery import Celery

app = Celery("tiny", broker=os.environ["TINY_BROKER_URL"])
app.conf.imports = ("django_cdp.tasks",)
"""


def test_wheel_with_redis_extra_runs_a_worker(redis_broker, dists, tmp_path):
    venv = tmp_path / "venv"
    python = venv_with_wheel(venv, dists, "redis")

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "tiny.py").write_text(TINY_APP)
    env = clean_env(PYTHONPATH=str(app_dir), TINY_BROKER_URL=redis_broker)
    where = subprocess.run(
        [python, "-c", "import django_cdp; print(django_cdp.__file__)"],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(venv))  # the wheel's copy, not the repository's
    queue = f"cdp-package-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    cmd = [python, "-m", "celery", "-A", "tiny", "worker", "-P", "solo", "-Q", queue]
    cmd += ["--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = Worker("packaged", log, proc)
    try:
        worker.wait_ready(60)
    finally:
        worker.stop()
    assert "django_cdp.tasks.deliver" in worker.output()  # the installed package's task
