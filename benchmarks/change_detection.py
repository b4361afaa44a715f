"""Change detection for ``Updated`` events: a narrow pre_save SELECT versus a post_init snapshot.

Run from the repository root (PostgreSQL answering on 127.0.0.1:5432)::

    .venv/bin/python benchmarks/change_detection.py            # full run, about 3 minutes
    .venv/bin/python benchmarks/change_detection.py --quick    # short run

Two ways to know which tracked fields an update changed (issue 2, "updated only
when it matters"):

* **SELECT** (what django-cdp implements): ``pre_save`` reads the tracked
  columns of the row (``signals.before_save``): one narrow SELECT per update,
  nothing at load time.
* **snapshot** (a prototype, in this file only): a ``post_init`` receiver on each
  registered model stores the tracked attnames' values on every instance Django
  builds; ``pre_save`` takes the reference values from that snapshot (no query)
  and ``post_save`` refreshes it. The prototype replaces
  ``django_cdp.capture.signals.before_save`` for its blocks; the rest of the core (diff,
  message, outbox row, re-identify) is unchanged, so the two differ only in
  detection.

Measured on PostgreSQL, in its own database (``cdp_bench_change_detection``,
dropped at the end), variants interleaved in shuffled blocks:

1. the update save path (median µs; ratio to untracked in the same mode), inside
   ``atomic()`` and in autocommit, with the instance held in memory ("update")
   and loaded by pk just before ("get + update", which pays post_init once);
2. loading 10,000 ``Payout`` rows with ``list(Payout.objects.all())`` and with
   ``.iterator()``, with and without the snapshot receiver connected.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common

DATABASE = "cdp_bench_change_detection"
ROWS = 10_000
AMOUNTS = _common.AMOUNTS
POOL = _common.POOL
SNAPSHOT = "_django_cdp_bench_snapshot"

SAVE_VARIANTS = ("untracked", "SELECT", "snapshot")
SAVE_OPS = ("update", "get + update")
MODES = ("atomic", "autocommit")
LOADS = ("list(all())", ".iterator()")
LOAD_VARIANTS = ("no receiver", "snapshot receiver")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--ops", type=int, help="timed updates per cell (default 2000)")
    parser.add_argument("--loads", type=int, help="timed loads of 10,000 rows per cell")
    parser.add_argument("--seed", type=int, default=20240602)
    args = parser.parse_args(argv)
    ops = args.ops or (200 if args.quick else 2000)
    loads = args.loads or (3 if args.quick else 40)
    _common.setup_django(DATABASE)
    with _common.bench_database():
        Bench(ops, loads, args.seed).run()
    return 0


class Snapshot:
    """The prototype: tracked columns captured when instances are built (``post_init``)."""

    def __init__(self) -> None:
        from django_cdp.registry import registry

        self.registry = registry
        self.attnames = {c.model: tuple(c.tracked_columns) for c in registry if c.tracked_columns}

    # post_init: one receiver per registered model with tracked columns
    def _receiver(self, attnames: tuple[str, ...]) -> Callable[..., None]:
        def snapshot(sender, instance, **kwargs) -> None:
            values = instance.__dict__
            # A deferred column (.only()/.defer()) is absent: left out, read by SELECT then.
            values[SNAPSHOT] = {a: values[a] for a in attnames if a in values}

        return snapshot

    def connect_loading(self) -> None:
        from django.db.models.signals import post_init

        for model, attnames in self.attnames.items():
            post_init.connect(
                self._receiver(attnames),
                sender=model,
                weak=False,
                dispatch_uid=f"bench-snapshot.{model._meta.label_lower}",
            )

    def disconnect_loading(self) -> None:
        from django.db.models.signals import post_init

        for model in self.attnames:
            post_init.disconnect(
                sender=model, dispatch_uid=f"bench-snapshot.{model._meta.label_lower}"
            )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Snapshot on load, detect from the snapshot, refresh it after each save."""
        from django.db.models.signals import post_save

        from django_cdp.capture import signals

        original = signals.before_save

        def before_save(instance, config, using, update_fields) -> None:
            if (
                signals.UPDATED not in config.events
                or instance._state.adding
                or instance.pk is None
            ):
                return
            written = signals.written_columns(config, update_fields)
            entry = signals.live_entry(using, "changes", (config.label, instance.pk))
            if entry is not None:
                instance.__dict__[signals._BEFORE] = signals._Before(entry.current, written)
                return
            columns = tuple(config.tracked_columns)
            snap = instance.__dict__.get(SNAPSHOT)
            if snap is None or any(c not in snap for c in columns):
                original(instance, config, using, update_fields)  # no snapshot: read the row
                return
            instance.__dict__[signals._BEFORE] = signals._Before(
                {c: signals._comparable(config, c, snap[c]) for c in columns}, written
            )

        def refresh(sender, instance, raw, **kwargs) -> None:
            # Connected after django-cdp's post_save, so it runs after the diff.
            attnames = self.attnames[sender]
            config = self.registry.get(sender)
            values = instance.__dict__
            values[SNAPSHOT] = {
                a: signals._comparable(config, a, values[a]) for a in attnames if a in values
            }

        self.connect_loading()
        for model in self.attnames:
            post_save.connect(
                refresh,
                sender=model,
                weak=False,
                dispatch_uid=f"bench-snapshot-refresh.{model._meta.label_lower}",
            )
        signals.before_save = before_save
        try:
            yield
        finally:
            signals.before_save = original
            for model in self.attnames:
                post_save.disconnect(
                    sender=model, dispatch_uid=f"bench-snapshot-refresh.{model._meta.label_lower}"
                )
            self.disconnect_loading()


def _columns(config, update_fields: frozenset[str] | None) -> list[str]:
    """The tracked columns an update writes (all of them, or those in ``update_fields``)."""
    columns = list(config.tracked_columns)
    if update_fields is None:
        return columns
    written = {
        f.attname
        for f in config.model._meta.concrete_fields
        if f.name in update_fields or f.attname in update_fields
    }
    return [c for c in columns if c in written]


class Bench:
    def __init__(self, ops: int, loads: int, seed: int) -> None:
        from django.db import connections, transaction

        from django_cdp import tracking_disabled
        from example_project.payouts.models import Payout
        from example_project.shops.models import Plan, Shop

        self.ops, self.loads, self.seed = ops, loads, seed
        self.connection = connections["default"]
        self.Payout = Payout
        plan = Plan.objects.create(name="Pro", monthly_price=Decimal("29.00"))
        with transaction.atomic():  # tracked: records the shop's traits digest
            self.shop = Shop.objects.create(domain="bench.example", email="a@b.c", plan=plan)
        with tracking_disabled():
            Payout.objects.bulk_create(
                [
                    Payout(shop=self.shop, amount=AMOUNTS[i % 2], currency="EUR", status="paid")
                    for i in range(ROWS)
                ],
                batch_size=2000,
            )
        # Each variant updates its own rows through its own held instances, so that a
        # snapshot is never left stale by another variant's saves.
        pks = list(Payout.objects.order_by("pk").values_list("pk", flat=True)[: POOL * 3])
        self.pool_pks = {v: pks[i * POOL : (i + 1) * POOL] for i, v in enumerate(SAVE_VARIANTS)}
        self.pool: dict[str, list] = {v: [] for v in SAVE_VARIANTS}
        self.stale = set(SAVE_VARIANTS)  # variants whose held instances must be (re)loaded
        self.snapshot = Snapshot()
        self.cursor = Counter()
        self.done: Counter[str] = Counter()

    @contextlib.contextmanager
    def variant(self, name: str) -> Iterator[None]:
        from django_cdp import tracking_disabled

        if name == "untracked":
            with tracking_disabled():
                yield
        elif name == "SELECT":
            yield
        elif name == "snapshot":
            with self.snapshot.active():
                yield
        else:
            raise ValueError(name)

    def operation(self, variant: str, op: str, mode: str) -> Callable[[int], object]:
        Payout, pool, pks = self.Payout, self.pool[variant], self.pool_pks[variant]

        def update(i: int) -> None:
            _common.toggle_amount(pool[i % POOL])

        def get_update(i: int) -> None:
            _common.toggle_amount(Payout.objects.get(pk=pks[i % POOL]))

        return _common.in_mode(update if op == "update" else get_update, mode)

    def run_updates(self, variant: str, op: str, mode: str, n: int, timed: bool) -> list[float]:
        func = self.operation(variant, op, mode)
        start = self.cursor[op]
        self.cursor[op] += n
        with self.variant(variant):
            if op == "update" and variant in self.stale:
                # Held instances saved through fresh copies are stale: reload them (in the
                # variant, so that the snapshot variant's instances carry their snapshot).
                pks = self.pool_pks[variant]
                self.pool[variant][:] = list(self.Payout.objects.filter(pk__in=pks).order_by("pk"))
                self.stale.discard(variant)
            out = _common.run_block(func, n, start, timed)
        if variant != "untracked":
            self.done["updated"] += n
        if op == "get + update":
            self.stale.add(variant)
        return out

    def count_sql(self, variant: str, op: str, mode: str, k: int = 4) -> tuple[float, str]:
        from django.test.utils import CaptureQueriesContext

        self.run_updates(variant, op, mode, 1, timed=False)
        with CaptureQueriesContext(self.connection) as captured:
            self.run_updates(variant, op, mode, k, timed=False)
        sql = [q["sql"] for q in captured.captured_queries]
        statements = len(sql) - sql.count("BEGIN") - sql.count("COMMIT")
        first = [s.split(" ", 1)[0] for s in sql[: len(sql) // k]]
        return statements / k, " ".join(first)

    def load(self, how: str) -> tuple[float, float]:
        """(wall ms, this process's CPU ms) to build every Payout instance of the table.

        The CPU time leaves out the server's work and the time this process waits for
        a core, so it is the steadier measure of what post_init adds on a busy machine.
        """
        import gc

        queryset = self.Payout.objects.all()
        gc.collect()
        gc.disable()
        try:
            t0, c0 = time.perf_counter_ns(), time.process_time_ns()
            n = len(list(queryset)) if how == LOADS[0] else sum(1 for _ in queryset.iterator())
            wall, cpu = (time.perf_counter_ns() - t0) / 1e6, (time.process_time_ns() - c0) / 1e6
        finally:
            gc.enable()
        assert n == ROWS, n
        return wall, cpu

    def run(self) -> None:
        print(
            f"# change detection: {self.ops} timed updates per cell; {self.loads} timed "
            f"loads of {ROWS} rows per cell"
        )
        print(f"# {_common.machine()}")
        print(
            f"# git {_common.git_revision()}, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
            f"load average {_common.load_average()} at start\n"
        )
        rng = random.Random(self.seed)

        # 1. update save path
        cells = [(v, o, m) for m in MODES for o in SAVE_OPS for v in SAVE_VARIANTS]
        sql = {cell: self.count_sql(*cell) for cell in cells}
        for cell in rng.sample(cells, len(cells)):
            self.run_updates(*cell, 50, timed=False)
        block = 10  # short blocks: the machine's noise spreads evenly over the variants
        blocks = [cell for cell in cells for _ in range(max(1, self.ops // block))]
        rng.shuffle(blocks)
        samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for cell in blocks:
            samples[cell] += self.run_updates(*cell, block, timed=True)

        # 2. loading 10,000 rows
        load_cells = [(v, h) for h in LOADS for v in LOAD_VARIANTS]
        load_blocks = [c for c in load_cells for _ in range(self.loads + 1)]
        rng.shuffle(load_blocks)
        load_times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        for variant, how in load_blocks:
            if variant == "snapshot receiver":
                self.snapshot.connect_loading()
            try:
                wall, cpu = self.load(how)
            finally:
                self.snapshot.disconnect_loading()
            if (variant, how) in seen:  # the first load of each cell is a warm-up
                load_times[variant, how, "wall"].append(wall)
                load_times[variant, how, "cpu"].append(cpu)
            seen.add((variant, how))

        self.report(cells, samples, sql, load_times)
        self.check()
        print(f"# load average {_common.load_average()} at the end")

    def report(self, cells, samples, sql, load_times) -> None:
        med = {cell: _common.median(samples[cell]) for cell in cells}
        print("## update save path: median µs per op (ratio to untracked in the same mode)\n")
        rows = []
        for variant in SAVE_VARIANTS:
            row = [variant]
            for mode in MODES:
                for op in SAVE_OPS:
                    value, base = med[variant, op, mode], med["untracked", op, mode]
                    row.append(f"{value:.0f} ({value / base:.2f}x)")
            rows.append(row)
        headers = ["detection"] + [f"{op}, {mode}" for mode in MODES for op in SAVE_OPS]
        print(_common.table(headers, rows))
        print()
        rows = []
        for mode in MODES:
            for op in SAVE_OPS:
                a, b = med["SELECT", op, mode], med["snapshot", op, mode]
                rows.append([f"{op}, {mode}", f"{a:.0f}", f"{b:.0f}", f"{b - a:+.0f}"])
        print("## side by side: SELECT vs snapshot (median µs per update)\n")
        print(_common.table(["op, mode", "SELECT", "snapshot", "snapshot - SELECT"], rows))
        print()
        print("## statements per update (BEGIN/COMMIT not counted)\n")
        rows = [
            [variant, mode, op, f"{sql[variant, op, mode][0]:g}", sql[variant, op, mode][1]]
            for mode in MODES
            for op in SAVE_OPS
            for variant in SAVE_VARIANTS
        ]
        print(_common.table(["detection", "mode", "op", "statements", "sequence"], rows))
        print()
        print(f"## loading {ROWS:,} Payout rows: median ms ({self.loads} loads per cell)\n")
        rows = []
        for how in LOADS:
            for clock in ("wall", "cpu"):
                base = _common.median(load_times["no receiver", how, clock])
                snap = _common.median(load_times["snapshot receiver", how, clock])
                rows.append(
                    [
                        how,
                        "wall clock" if clock == "wall" else "process CPU",
                        f"{base:.1f}",
                        f"{snap:.1f}",
                        f"{snap / base:.2f}x",
                        f"{(snap - base) * 1000 / ROWS:+.2f}",
                    ]
                )
        headers = ["load", "time", "no receiver ms", "snapshot receiver ms", "ratio", "µs per row"]
        print(_common.table(headers, rows))
        print()

    def check(self) -> None:
        from django_cdp.models import Message

        updated = Message.objects.filter(event="Payout Updated").count()
        status = "OK" if updated == self.done["updated"] else "MISMATCH"
        print(
            f"# check: {updated} Payout Updated messages for {self.done['updated']} tracked "
            f"updates: {status}"
        )
        if status != "OK":
            raise SystemExit("tracked updates and messages differ")


if __name__ == "__main__":
    sys.exit(main())
