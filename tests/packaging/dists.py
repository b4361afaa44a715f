"""Building django-cdp's distributions and installing them where the repository is not.

Shared by the packaging tests: one build per run (the ``dists`` fixture), and virtualenvs
that see only what was installed into them, as a user's would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; its output, or a failure showing the end of it."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path


def build(out: Path) -> Dists:
    """``python -m build``: the sdist, then the wheel built from that sdist (not from the
    checkout), so that a file the sdist leaves out is missing from the wheel too."""
    run(sys.executable, "-m", "build", "--outdir", out, REPO, cwd=out.parent)
    (wheel,) = out.glob("django_cdp-*.whl")
    (sdist,) = out.glob("django_cdp-*.tar.gz")
    return Dists(wheel, sdist)


def new_venv(path: Path) -> Path:
    """A new virtualenv at ``path``; its python."""
    run(sys.executable, "-m", "venv", path, cwd=path.parent)
    return path / "bin" / "python"


def venv_with_wheel(path: Path, dists: Dists, extra: str) -> Path:
    """A new virtualenv at ``path`` with the wheel and its ``extra`` installed; its python."""
    python = new_venv(path)
    run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        f"django-cdp[{extra}] @ {dists.wheel.as_uri()}",
        cwd=path.parent,
    )
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would import the repository's copy."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    env.update(extra)
    return env
