"""Every command answers a bad argument with an error naming the value, never a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from django_cdp.management.base import CdpCommand
from django_cdp.management.commands import (
    cdp_backfill_identify,
    cdp_deliver,
    cdp_devserver,
    cdp_dictionary,
    cdp_health,
    cdp_purge,
)
from django_cdp.models import Message
from tests.admin.conftest import create_message

REPO = Path(__file__).resolve().parents[2]
WITH_DATABASE = ["cdp_backfill_identify", "cdp_deliver", "cdp_health", "cdp_purge"]


def test_every_command_shares_the_base():
    modules = (
        cdp_backfill_identify,
        cdp_deliver,
        cdp_devserver,
        cdp_dictionary,
        cdp_health,
        cdp_purge,
    )
    assert all(issubclass(module.Command, CdpCommand) for module in modules)


@pytest.mark.parametrize("command", WITH_DATABASE)
def test_an_unknown_database_is_named(command):
    with pytest.raises(CommandError, match=r"'nope' is not a database alias.*default, other"):
        call_command(command, "--database", "nope")


@pytest.mark.parametrize(
    ("command", "args", "value"),
    [
        ("cdp_devserver", ["--port", "99999"], "'99999'"),
        ("cdp_devserver", ["--port", "-1"], "'-1'"),
        ("cdp_devserver", ["--port", "http"], "'http'"),
        ("cdp_deliver", ["--loop", "--interval", "0"], "'0'"),
        ("cdp_deliver", ["--interval", "-2"], "'-2'"),
        ("cdp_deliver", ["--interval", "nan"], "'nan'"),
        ("cdp_deliver", ["--interval", "inf"], "'inf'"),
        ("cdp_deliver", ["--time-budget", "0"], "'0'"),
        ("cdp_deliver", ["--time-budget", "nan"], "'nan'"),
        ("cdp_health", ["--max-pending-age", "nan"], "'nan'"),
        ("cdp_health", ["--max-pending-age", "inf"], "'inf'"),
        ("cdp_health", ["--max-pending-age", "1e300"], "'1e300'"),
        ("cdp_health", ["--max-pending-age", "-5"], "'-5'"),
        ("cdp_health", ["--max-failure-rate", "nan"], "'nan'"),
        ("cdp_health", ["--max-failure-rate", "1.5"], "'1.5'"),
        ("cdp_health", ["--max-failure-rate", "-0.1"], "'-0.1'"),
        ("cdp_purge", ["--older-than", "-1"], "'-1'"),
        ("cdp_purge", ["--older-than", "1e3"], "'1e3'"),
        ("cdp_purge", ["--older-than", "99999999"], "'99999999'"),
        ("cdp_purge", ["--batch-size", "0"], "'0'"),
        ("cdp_backfill_identify", ["--batch-size", "0"], "'0'"),
        ("cdp_backfill_identify", ["--batch-size", "many"], "'many'"),
    ],
)
def test_a_bad_value_is_named(command, args, value):
    with pytest.raises(CommandError) as raised:
        call_command(command, *args)
    message = str(raised.value)
    assert f"argument {args[-2]}" in message
    assert f"got {value}" in message


def test_an_unwritable_output_is_named(tmp_path):
    missing = tmp_path / "no-such-dir" / "dictionary.md"
    with pytest.raises(CommandError, match=f"--output '{missing}': cannot write it"):
        call_command("cdp_dictionary", "--output", str(missing))
    with pytest.raises(CommandError, match=f"--output '{tmp_path}': cannot write it"):
        call_command("cdp_dictionary", "--output", str(tmp_path))  # a directory


def test_older_than_0_keeps_everything_as_retention_days_0_does(db, settings):
    old = timezone.now() - timedelta(days=400)
    create_message(status=Message.Status.SENT, created_at=old)
    create_message(status=Message.Status.SKIPPED, created_at=old)
    out = io.StringIO()
    call_command("cdp_purge", "--older-than", "0", stdout=out)
    assert out.getvalue() == "--older-than is 0: messages are kept; nothing purged.\n"
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "RETENTION_DAYS": 0}
    out = io.StringIO()
    call_command("cdp_purge", stdout=out)
    assert out.getvalue() == "RETENTION_DAYS is 0: messages are kept; nothing purged.\n"
    assert Message.objects.count() == 2


def test_good_values_still_parse(db):
    out = io.StringIO()
    call_command(
        "cdp_health", "--max-pending-age", "0", "--max-failure-rate", "1", "--json", stdout=out
    )
    assert '"ok": true' in out.getvalue()
    call_command("cdp_purge", "--older-than", "1", "--database", "default", stdout=out)
    assert "Deleted 0 sent, skipped or superseded message(s) older than 1 day(s)" in out.getvalue()


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["cdp_devserver", "--port", "99999"], 2, "argument --port: expected a port"),
        (["cdp_health", "--database", "nope"], 2, "argument --database: 'nope'"),
        (["cdp_dictionary", "--output", "/no-such-dir/d.md"], 1, "'/no-such-dir/d.md'"),
    ],
)
def test_from_the_command_line_no_traceback(args, code, named):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DJANGO_SETTINGS_MODULE": "tests.settings"}
    proc = subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr
