"""Shared plumbing of the benchmarks: Django setup, a throwaway PostgreSQL database, stats."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def setup_django(database: str) -> None:
    """Configure Django with ``benchmarks.settings`` on the database ``database``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    os.environ["CDP_BENCH_DB"] = database
    import django

    django.setup()


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """Create and migrate the benchmark database, and drop it afterwards."""
    from django.db import connection
    from django.test.utils import setup_test_environment, teardown_test_environment

    setup_test_environment(debug=False)
    old_name = connection.settings_dict["NAME"]
    name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        yield name
    finally:
        connection.close()
        connection.creation.destroy_test_db(old_name, verbosity=0)
        teardown_test_environment()


def machine() -> str:
    """One line describing where the figures come from."""
    import django
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0]
        cursor.execute("SHOW synchronous_commit")
        sync = cursor.fetchone()[0]
    import psycopg

    return (
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, Django {django.get_version()}, "
        f"psycopg {psycopg.__version__}, PostgreSQL {pg} (TCP 127.0.0.1, "
        f"synchronous_commit={sync})"
    )


def load_average() -> str:
    """The 1-minute load average (other processes on the machine disturb the figures)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


#: The two amounts an update alternates between, so that every update really changes a row.
AMOUNTS = (Decimal("120.00"), Decimal("245.50"))
#: Rows the updates cycle through.
POOL = 50


def toggle_amount(payout: Any) -> None:
    """Save ``payout`` with its amount switched to the other of :data:`AMOUNTS`."""
    payout.amount = AMOUNTS[1] if payout.amount == AMOUNTS[0] else AMOUNTS[0]
    payout.save()


def in_mode(func: Callable[[int], object], mode: str) -> Callable[[int], object]:
    """``func`` as is in ``"autocommit"``, or inside its own ``atomic()`` block per call."""
    if mode == "autocommit":
        return func
    from django.db import transaction

    def atomic(i: int) -> None:
        with transaction.atomic():
            func(i)

    return atomic


def run_block(func: Callable[[int], object], n: int, start: int, timed: bool) -> list[float]:
    """Run ``func(start)`` … ``func(start + n - 1)``; their durations in µs when ``timed``."""
    if timed:
        return timed_block(func, n, start)
    for i in range(start, start + n):
        func(i)
    return []


def timed_block(op: Callable[[int], object], n: int, start: int = 0) -> list[float]:
    """Run ``op(i)`` ``n`` times; the duration of each call in µs.

    The garbage collector stays on: its rare pauses land in the tail, not the median.
    """
    clock = time.perf_counter_ns
    out = []
    for i in range(start, start + n):
        t0 = clock()
        op(i)
        out.append((clock() - t0) / 1000)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (aligned for reading in a terminal too)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
