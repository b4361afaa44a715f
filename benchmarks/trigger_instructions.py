"""Instructions PostgreSQL spends on a tracked write, counted by callgrind (issue 9).

Run from the repository root (PostgreSQL answering on 127.0.0.1:5432, ``valgrind`` and
PostgreSQL's server programs installed)::

    .venv/bin/python benchmarks/trigger_instructions.py            # about 2 minutes
    .venv/bin/python benchmarks/trigger_instructions.py --bindir /usr/lib/postgresql/15/bin

Wall-clock ratios on a shared 2-core machine move by ±0.05x between runs
(``save_path.py``); the number of instructions a backend executes does not, whatever else
the machine does, so this is the figure to steer the trigger engine's SQL by. The script:

1. creates and migrates the benchmark database (``cdp_bench_instructions``, dropped at the
   end) with ``benchmarks.settings``, installs the trigger engine's functions, and writes the
   plan and shop that ``save_path.py`` uses (the shop identified, so a Payout change's
   re-identify finds its traits unchanged);
2. copies that database into a scratch cluster (``initdb`` in a temporary directory);
3. runs a single-user backend (``postgres --single``, no client, no network) under
   ``valgrind --tool=callgrind`` twice per case, with 20 and with 120 statements, and
   divides the difference by 100: the instructions of one statement, its commit included,
   without the backend's start-up.

Cases: a ``Payout`` create and update (each statement its own transaction, as in
autocommit), untracked (the triggers disabled) and tracked; and a ``QuerySet.update()`` of
10,000 rows, per row. For the tracked cases it prints how many of those instructions the
trigger function runs, and three parts of them: the executor's start-up of the trigger's
statements, the outbox's index entries and the JSON functions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common

DATABASE = "cdp_bench_instructions"
SCRATCH_DATABASE = "bench"
#: (label, statement, statements per run): the difference of two runs is divided by the
#: difference of their counts (and, for the bulk case, by the rows of one statement).
CREATE = (
    "INSERT INTO payouts_payout (shop_id, amount, currency, status, created_at) "
    "VALUES ({shop}, 245.50, 'EUR', 'paid', now());"
)
UPDATE = (
    "UPDATE payouts_payout SET amount = CASE WHEN amount = 245.50 THEN 120.00 ELSE 245.50 END "
    "WHERE id = {payout};"
)
BULK_ROWS = 10_000
BULK = (
    "UPDATE payouts_payout SET amount = amount + 1 WHERE id IN "
    f"(SELECT id FROM payouts_payout ORDER BY id LIMIT {BULK_ROWS});"
)
#: Functions whose inclusive counts are shown as parts of the tracked cases.
PARTS = {
    "trigger": ("plpgsql_exec_trigger",),
    "executor start-up": ("standard_ExecutorStart",),
    "index entries": ("ExecInsertIndexTuples",),
    "JSON functions": ("jsonb_build_object", "to_jsonb", "jsonb_out", "md5_text"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bindir", help="PostgreSQL's server programs (default: pg_config)")
    args = parser.parse_args(argv)
    bindir = Path(args.bindir or _pg_bindir())
    if not shutil.which("valgrind"):
        print("trigger_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    _common.setup_django(DATABASE)
    with _common.bench_database() as name, tempfile.TemporaryDirectory() as tmp:
        shop, payout = _prepare()
        os.chmod(tmp, 0o777)  # the scratch cluster may belong to another user (see _as_owner)
        scratch = Scratch(bindir, Path(tmp))
        scratch.copy_from(name)
        print(f"# {_common.machine()}")
        print(
            f"# git {_common.git_revision()}; a single-user backend under callgrind "
            "(synchronous_commit=off): instructions per op, (120 ops - 20 ops) / 100"
        )
        print(
            "# backend ratio: the backend's instructions only (no client, network or commit "
            "flush); the trigger's parts: inclusive counts of PostgreSQL functions, overlapping"
        )
        rows = []
        for label, statement, rows_per_op in (
            ("create", CREATE.format(shop=shop), 1),
            ("update", UPDATE.format(payout=payout), 1),
            (f"update of {BULK_ROWS:,} rows, per row", BULK, BULK_ROWS),
        ):
            counts = {}
            for tracked in (False, True):
                low, high = (1, 2) if rows_per_op > 1 else (20, 120)
                first = scratch.profile(statement, low, tracked)
                second = scratch.profile(statement, high, tracked)
                per_op = {
                    k: (second.get(k, 0) - first.get(k, 0)) / (high - low) / rows_per_op
                    for k in second
                }
                counts[tracked] = per_op
            base, cdp = counts[False]["TOTAL"], counts[True]["TOTAL"]
            parts = [
                _k(sum(counts[True].get(f, 0) - counts[False].get(f, 0) for f in functions))
                for functions in PARTS.values()
            ]
            rows.append([label, _k(base), _k(cdp), f"{cdp / base:.2f}x", *parts])
        print(_common.table(["op", "untracked", "tracked", "backend ratio", *PARTS], rows))
    return 0


def _k(value: float) -> str:
    return f"{value / 1000:,.0f}k"


def _pg_bindir() -> str:
    try:
        return subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit("trigger_instructions: pg_config not found; pass --bindir")


def _prepare() -> tuple[int, int]:
    """Install the trigger engine and write the plan, the identified shop and one payout."""
    from django.conf import settings
    from django.db import transaction
    from django.test import override_settings

    from django_cdp import tracking_disabled
    from django_cdp.capture import triggers
    from example_project.payouts.models import Payout
    from example_project.shops.models import Plan, Shop

    # Entered and never left: leaving would put the setting back, and with it uninstall
    # the triggers before the database is copied.
    override_settings(DJANGO_CDP={**settings.DJANGO_CDP, "CAPTURE": "triggers"}).enable()
    triggers.install("default", force=True)
    with transaction.atomic():
        plan = Plan.objects.create(name="Pro", monthly_price=Decimal("29.00"))
        shop = Shop.objects.create(domain="bench.example", email="a@b.c", plan=plan)
    with tracking_disabled(), transaction.atomic():
        payout = Payout.objects.create(shop=shop, amount=Decimal("245.50"), currency="EUR")
        Payout.objects.bulk_create(
            Payout(shop=shop, amount=Decimal("10.00"), currency="EUR") for _ in range(BULK_ROWS)
        )
    return shop.pk, payout.pk


class Scratch:
    """A throw-away cluster holding a copy of the benchmark database."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.root = bindir, root
        self.data = root / "data"

    def _as_owner(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        """Run a server program; PostgreSQL refuses to run as root, so as ``postgres`` then."""
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], check=True, **kwargs)  # type: ignore[call-overload]

    def copy_from(self, database: str) -> None:
        from django.db import connection

        dump = self.root / "dump.sql"
        params = connection.get_connection_params()
        env = {**os.environ, "PGPASSWORD": str(params.get("password") or "")}
        with dump.open("w") as out:
            subprocess.run(
                [
                    "pg_dump",
                    "--no-owner",
                    "--no-privileges",
                    "-h", str(params.get("host") or "127.0.0.1"),
                    "-p", str(params.get("port") or 5432),
                    "-U", str(params.get("user") or "postgres"),
                    database,
                ],
                stdout=out, env=env, check=True,
            )  # fmt: skip
        dump.chmod(0o644)
        quiet = {"stdout": subprocess.DEVNULL}
        self._as_owner(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            **quiet,
        )
        socket = str(self.root)
        options = f"-k {socket} -c listen_addresses=''"
        ctl = str(self.bindir / "pg_ctl")
        self._as_owner([ctl, "-D", str(self.data), "-o", options, "-w", "start"], **quiet)
        try:
            psql = ["psql", "-q", "-h", socket, "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
            self._as_owner([*psql, "-c", f"CREATE DATABASE {SCRATCH_DATABASE}"], **quiet)
            self._as_owner([*psql, "-d", SCRATCH_DATABASE, "-f", str(dump)], **quiet)
        finally:
            self._as_owner([ctl, "-D", str(self.data), "-w", "stop"], **quiet)

    def profile(self, statement: str, count: int, tracked: bool) -> dict[str, int]:
        """Inclusive instruction counts of a single-user backend running ``statement``
        ``count`` times (``TOTAL``: all of them)."""
        switch = "ENABLE" if tracked else "DISABLE"
        script = self.root / "script.sql"
        script.write_text(
            f"ALTER TABLE payouts_payout {switch} TRIGGER USER;\n" + (statement + "\n") * count
        )
        script.chmod(0o644)
        out = self.root / f"callgrind.{count}.{int(tracked)}"
        with script.open() as stdin:
            self._as_owner(
                [
                    "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    str(self.bindir / "postgres"), "--single", "-D", str(self.data),
                    "-c", "synchronous_commit=off", SCRATCH_DATABASE,
                ],
                stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        return _inclusive(out)


def _inclusive(path: Path) -> dict[str, int]:
    """Inclusive instruction counts per function name of a callgrind output."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+)\s+\([\s\d.]+%\)\s+(?:\S*:)?([^\s\[']+)", line)
        if match:
            name = "TOTAL" if "PROGRAM TOTALS" in line else match.group(2)
            counts[name] = max(counts.get(name, 0), int(match.group(1).replace(",", "")))
    return counts


if __name__ == "__main__":
    sys.exit(main())
