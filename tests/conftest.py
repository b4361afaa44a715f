"""Suite-wide pytest configuration: which database the run uses, and what it skipped.

``CDP_TEST_DATABASE=postgres`` runs the suite on PostgreSQL (see ``tests/settings.py``);
anything else runs it on SQLite and skips the tests marked ``postgres``. ``bin/test``
runs both passes. Tests marked ``redis`` are skipped by their own conftest when Redis
is not answering.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATABASE = "postgres" if os.environ.get("CDP_TEST_DATABASE") == "postgres" else "sqlite"

POSTGRES_SKIP_REASON = (
    "needs PostgreSQL: run `bin/test` with PostgreSQL answering on 127.0.0.1:5432, "
    "or `CDP_TEST_DATABASE=postgres pytest`"
)


def pytest_report_header(config: pytest.Config) -> str:
    return f"django-cdp test database: {DATABASE} (CDP_TEST_DATABASE)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests of the signal engine alone are not run under the trigger engine, deferring or not
    # (left out, not skipped: nothing is counted that did not run).
    kept = [
        item
        for item in items
        if not (
            item.get_closest_marker("signals_only") is not None
            and getattr(item, "callspec", None) is not None
            and item.callspec.params.get("engine") in ("triggers", "immediate")
        )
    ]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
    if DATABASE == "postgres":
        return
    skip = pytest.mark.skip(reason=POSTGRES_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("postgres") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    stats = terminalreporter.stats

    def count(*keys: str) -> int:
        return sum(len(stats.get(key, [])) for key in keys)

    counts = {
        "passed": count("passed"),
        "failed": count("failed", "error"),
        "skipped": count("skipped"),
    }
    postgres_skipped = sum(
        1
        for report in stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and POSTGRES_SKIP_REASON in str(report.longrepr[2])
    )
    line = (
        f"django-cdp on {DATABASE}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped"
    )
    if postgres_skipped:
        line += f" ({postgres_skipped} need PostgreSQL: CDP_TEST_DATABASE=postgres)"
    terminalreporter.write_sep("-", line)

    counts_file = os.environ.get("CDP_TEST_COUNTS_FILE")
    if counts_file:
        Path(counts_file).write_text(json.dumps(counts))


@pytest.fixture
def engine(transactional_db) -> str:
    """The capture engine of the suites outside ``tests/core``: the suite's default (signals).

    ``tests/core`` overrides it to run its behaviour tests under both engines.
    """
    return "signals"
