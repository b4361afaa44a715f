"""``cdp_deliver`` as cron and process managers run it: a real ``manage.py`` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from django.db import connections

from tests.delivery.conftest import REPO, cdp_config, make_messages, statuses, wait_until


def _command(data_plane, *args: str) -> subprocess.Popen:
    config = cdp_config(data_plane)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "tests.delivery.settings_worker",
        "CDP_WORKER_DB_NAME": str(connections["default"].settings_dict["NAME"]),
        "CDP_WORKER_CDP": json.dumps(config, default=str),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "django", "cdp_deliver", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_drains_once_and_exits_0(transactional_db, data_plane):
    make_messages(5)
    proc = _command(data_plane)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "sent 5" in out
    assert statuses() == {"sent": 5} and len(data_plane.messages) == 5


def test_loop_keeps_draining_and_stops_on_sigterm(transactional_db, data_plane):
    make_messages(3)
    proc = _command(data_plane, "--loop", "--interval", "0.2")
    try:
        assert data_plane.wait_for(3, 30)
        make_messages(4)  # written while the loop runs
        assert data_plane.wait_for(7, 10)
        assert wait_until(lambda: statuses() == {"sent": 7}, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
