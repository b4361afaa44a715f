"""Backfill throughput and peak memory: ``cdp_backfill_identify`` against a naive loop.

Run from the repository root (PostgreSQL answering on 127.0.0.1:5432)::

    .venv/bin/python benchmarks/backfill.py            # 10k, 100k and 1M shops, ~10 minutes
    .venv/bin/python benchmarks/backfill.py --quick    # 10k and 50k shops, ~2 minutes

It creates and migrates its own database (``cdp_bench_backfill``, dropped at the
end) with ``benchmarks.settings`` (the example project's tracking plan: four
traits, one of them through ``plan__name``). For each size the shops table is
truncated and refilled with ``COPY``, the outbox and the digests are emptied,
and the run happens in a **child process** (one per run), which reports its own
peak RSS (``ru_maxrss``) when it is done, so every figure is that run's peak and
nothing of the parent (or of an earlier run) is counted.

* **backfill**: ``manage.py cdp_backfill_identify`` (default ``--batch-size
  500``, output to /dev/null): one identify per shop, written with
  ``bulk_create`` per batch.
* **naive loop**: ``for shop in Shop.objects.iterator(): django_cdp.identify(shop)``,
  the one-liner a team would write otherwise (each call a short transaction of
  its own: trait read with the digest, INSERT, digest upsert, commit). It runs
  on 10,000 shops only (``NAIVE_SIZES``): at about 150 identifies/s on the
  reference machine, 100,000 rows take over 10 minutes and 1,000,000 about two
  hours.

The bar (issue 5): peak RSS at 1,000,000 shops at most 1.2x the peak at 10,000.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common

DATABASE = "cdp_bench_backfill"
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 50_000)
NAIVE_SIZES = (10_000,)
QUICK_NAIVE_SIZES = (10_000,)


def load_shops(n: int) -> None:
    """Empty shops, outbox and digests; COPY ``n`` shops on two plans."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE shops_shop, shops_plan, django_cdp_message, django_cdp_traitsdigest "
            "RESTART IDENTITY CASCADE"
        )
        cursor.execute(
            "INSERT INTO shops_plan (name, monthly_price) VALUES ('Growth', 49), ('Scale', 199)"
        )
    raw = connection.connection
    with (
        raw.cursor() as cursor,
        cursor.copy(
            "COPY shops_shop (domain, email, plan_id, active, xero_connection_ok, created_at) "
            "FROM STDIN"
        ) as copy,
    ):
        for i in range(n):
            copy.write_row(
                (
                    f"shop{i}.example",
                    f"owner{i}@shop{i}.example",
                    1 + i % 2,
                    True,
                    i % 7 != 0,
                    "2024-01-01 00:00:00+00",
                )
            )
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE shops_shop")


def child(kind: str) -> None:
    """Run one variant in this (fresh) process and print its figures as JSON."""
    _common.setup_django(DATABASE)
    from django.core.management import call_command

    import django_cdp
    from django_cdp.models import Message
    from example_project.shops.models import Shop

    started = time.perf_counter()
    if kind == "backfill":
        call_command("cdp_backfill_identify", stdout=io.StringIO(), stderr=io.StringIO())
    else:
        for shop in Shop.objects.iterator(chunk_size=2000):
            django_cdp.identify(shop)
    seconds = time.perf_counter() - started
    rows = Message.objects.filter(type="identify").count()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "identifies": rows, "peak_kib": peak_kib}))


def run_child(kind: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "CDP_BENCH_DB": DATABASE},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=["backfill", "naive"])
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    sizes = QUICK_SIZES if args.quick else SIZES
    naive_sizes = QUICK_NAIVE_SIZES if args.quick else NAIVE_SIZES
    _common.setup_django(DATABASE)
    results: dict[tuple[str, int], dict] = {}
    with _common.bench_database():
        machine = _common.machine()
        for n in sizes:
            variants = ["backfill", *(["naive"] if n in naive_sizes else [])]
            for kind in variants:
                t0 = time.perf_counter()
                load_shops(n)
                load = time.perf_counter() - t0
                r = run_child(kind)
                assert r["identifies"] == n, r
                results[(kind, n)] = r
                print(
                    f"{kind:8} {n:>9,} shops: {n / r['seconds']:>9,.0f} identifies/s, "
                    f"{r['seconds']:7.1f} s, peak RSS {r['peak_kib'] / 1024:6.1f} MiB "
                    f"(load {load:.1f} s)",
                    flush=True,
                )
    rows = []
    for (kind, n), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = "cdp_backfill_identify" if kind == "backfill" else "naive identify() loop"
        rows.append(
            [
                f"{n:,}",
                name,
                f"{n / r['seconds']:,.0f}",
                f"{r['seconds']:.1f}",
                f"{r['peak_kib'] / 1024:.1f}",
            ]
        )
    print()
    print(
        f"Machine: {machine}; load average {_common.load_average()}; "
        f"commit {_common.git_revision()}"
    )
    print()
    print(_common.table(["shops", "variant", "identifies/s", "seconds", "peak RSS MiB"], rows))
    small, large = ("backfill", min(sizes)), ("backfill", max(sizes))
    ratio = results[large]["peak_kib"] / results[small]["peak_kib"]
    verdict = "meets" if ratio <= 1.2 else "MISSES"
    print()
    print(f"Peak RSS {max(sizes):,} / {min(sizes):,} shops: {ratio:.3f} ({verdict} the 1.2x bar)")
    for n in naive_sizes:
        if ("naive", n) in results and ("backfill", n) in results:
            speedup = results[("naive", n)]["seconds"] / results[("backfill", n)]["seconds"]
            print(f"Backfill vs naive loop at {n:,} shops: {speedup:.1f}x faster")


if __name__ == "__main__":
    main()
