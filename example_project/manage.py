#!/usr/bin/env python
"""Django's command-line utility for the example project.

Run it from anywhere, usually the repository root: ``python example_project/manage.py migrate``.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The repository root, so that ``example_project`` and ``django_cdp`` import without installing.
REPO_ROOT = HERE.parent


def main() -> None:
    # Python put this script's folder first on sys.path; there ``import celery`` would find
    # example_project/celery.py instead of the Celery package. Use the repository root instead.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    try:
        from django.core.management import execute_from_command_line
    except ImportError as exc:
        raise ImportError(
            "Couldn't import Django. Run bin/example from the repository root (it creates "
            ".venv and installs everything), or activate .venv first."
        ) from exc
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
