"""The shipped pieces a user runs: migrations, and the example project's configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_migrations_match_the_models():
    out = StringIO()
    call_command("makemigrations", "django_cdp", check=True, dry_run=True, stdout=out)
    assert "No changes detected" in out.getvalue()


def test_example_project_passes_manage_py_check(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "RUDDERSTACK_WRITE_KEY": "test-key",
        "RUDDERSTACK_DATA_PLANE_URL": "http://127.0.0.1:8787",
    }
    result = subprocess.run(
        [sys.executable, "example_project/manage.py", "check", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "django_cdp.E" not in result.stdout + result.stderr
