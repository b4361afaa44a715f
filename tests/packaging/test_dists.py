"""The wheel and the sdist are complete, pass ``twine check``, and the wheel runs a project.

``python -m build`` makes both (the wheel from the sdist). They must carry every module,
template, static file, migration and ``py.typed`` of ``django_cdp``; and the wheel,
installed into a fresh virtualenv with nothing of the repository on the path, must run the
example project's ``manage.py check``. Building and installing take about half a minute,
so these run once, in the PostgreSQL pass (``.ci/run`` runs ``tests/packaging`` as a step of
its own).
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import zipfile

import pytest

from tests.packaging.dists import REPO, clean_env, run, venv_with_wheel

pytestmark = pytest.mark.postgres

#: What the package is made of: every file under django_cdp/ but bytecode.
SHIPPED = sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "django_cdp").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
)


def test_the_package_has_templates_migrations_and_py_typed():
    assert "django_cdp/py.typed" in SHIPPED
    assert "django_cdp/migrations/0001_initial.py" in SHIPPED
    assert any(name.startswith("django_cdp/templates/") for name in SHIPPED)


def test_the_wheel_carries_every_file_of_the_package(dists):
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = {n for n in wheel.namelist() if n.startswith("django_cdp/")}
    assert sorted(names) == SHIPPED


def test_the_sdist_carries_every_file_of_the_package(dists):
    with tarfile.open(dists.sdist) as sdist:
        root = sdist.getnames()[0].split("/")[0]
        names = {
            n.removeprefix(f"{root}/") for n in sdist.getnames() if sdist.getmember(n).isfile()
        }
    assert set(SHIPPED) <= names
    assert {"pyproject.toml", "README.md"} <= names


def test_twine_check_passes(dists):
    out = run(
        sys.executable, "-m", "twine", "check", "--strict", dists.wheel, dists.sdist, cwd=REPO
    )
    assert out.count("PASSED") == 2, out


def test_the_wheel_runs_the_example_projects_check_in_a_clean_virtualenv(dists, tmp_path):
    python = venv_with_wheel(tmp_path / "venv", dists, "example")
    # A copy of the example project alone: its manage.py puts its parent folder on the path,
    # which in the repository would import the checkout's django_cdp instead of the wheel's.
    app = tmp_path / "app"
    shutil.copytree(
        REPO / "example_project",
        app / "example_project",
        ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3", ".env"),
    )
    env = clean_env(
        DATABASE_URL="sqlite:///:memory:",
        CELERY_BROKER_URL="",
        RUDDERSTACK_WRITE_KEY="package-test",
        RUDDERSTACK_DATA_PLANE_URL="http://127.0.0.1:9",
    )
    manage = ["example_project/manage.py"]
    where = run(
        python,
        *manage,
        "shell",
        "--no-imports",
        "-c",
        "import django_cdp; print(django_cdp.__file__)",
        cwd=app,
        env=env,
    )
    assert where.strip().startswith(str(tmp_path / "venv"))  # the wheel's copy
    # A warning fails the run, and the failure shows it (check writes issues to stderr).
    out = run(python, *manage, "check", "--fail-level", "WARNING", cwd=app, env=env)
    assert "System check identified no issues" in out
