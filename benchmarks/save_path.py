"""Save-path cost of tracking a ``payouts.Payout`` create and update (issue 2's acceptance).

Run from the repository root (PostgreSQL answering on 127.0.0.1:5432)::

    .venv/bin/python benchmarks/save_path.py            # full run, about 3 minutes
    .venv/bin/python benchmarks/save_path.py --quick    # short run, about 30 seconds

It creates and migrates its own database (``cdp_bench_save_path``, dropped at the
end) with ``benchmarks.settings``: the example project's models and the test
suite's ``DJANGO_CDP`` tracking plan, plus ``auditlog``. Variants, all on the same
``Payout`` table, in one process, in shuffled interleaved blocks:

* **untracked**: django-cdp switched off with ``tracking_disabled()`` (its
  receivers stay connected and return at once). The baseline of every ratio.
* **plain Django**: django-cdp's receivers disconnected (no receiver at all), to
  show what the switched-off receivers cost.
* **django-cdp signals**: the Payout tracked with the example plan (properties amount,
  currency, status; owner shop; re-identify the shop) by the signal engine.
* **signals, identify off**: the same with ``"identify": False`` on Payout: the
  difference to **django-cdp signals** is what the re-identify's read of the shop's
  traits (with their digest) costs every child change.
* **django-cdp triggers**: the same plan captured by the trigger engine (its functions
  installed once, its triggers created for this variant's blocks only).
* **triggers, request context**: the triggers variant inside the context
  ``RequestContextMiddleware`` sets for a typical request (IP, user agent, page, locale,
  request id, anonymousId): each write carries it to the triggers in a
  ``set_config`` in front of its SQL, and every message gets it.
* **auditlog**: ``auditlog.register(Payout)`` for the blocks of this variant only
  (unregistered afterwards); django-cdp switched off.
* **SDK track()**: a hand-written ``post_save`` receiver calling
  ``rudderstack.analytics.Client.track()`` on every save, with ``send=False`` (the
  message is built, validated and sized, then dropped before the queue: no
  thread, no socket); django-cdp switched off.

Each is measured inside ``transaction.atomic()`` (one op per atomic block, the
commit included) and in autocommit. An update changes ``amount`` each time
(alternating two values) so every tracked variant emits a message. The shop's
traits never change, so django-cdp's re-identify after each Payout change reads
them, finds the recorded digest equal and writes nothing (one SELECT).

Statements per op are counted apart from the timed loop with
``CaptureQueriesContext`` (cursor statements); transactions opened and committed
explicitly (``BEGIN``/``COMMIT`` round trips, which that context does not see) are
counted separately.
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

DATABASE = "cdp_bench_save_path"
AMOUNTS = _common.AMOUNTS
POOL = _common.POOL
SIGNALS, TRIGGERS = "django-cdp signals", "django-cdp triggers"
IN_REQUEST = "triggers, request context"
VARIANTS = (
    "untracked",
    "plain Django",
    SIGNALS,
    "signals, identify off",
    TRIGGERS,
    IN_REQUEST,
    "auditlog",
    "SDK track()",
)
#: The variants that write django-cdp messages (checked at the end).
TRACKED = (SIGNALS, "signals, identify off", TRIGGERS, IN_REQUEST)
#: What RequestContextMiddleware puts into the context of a typical request.
REQUEST_CONTEXT = {
    "ip": "203.0.113.24",
    "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "page": {
        "path": "/payouts/new/",
        "url": "https://app.example/payouts/new/?utm_source=newsletter",
        "search": "?utm_source=newsletter",
        "referrer": "https://app.example/payouts/",
    },
    "locale": "en-GB",
    "requestId": "7f1c9e2a-5b1d-4c43-9a3e-2f4f1d1c8b77",
}
OPS = ("create", "update")
MODES = ("atomic", "autocommit")
BASELINE = "untracked"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a short run (300 ops per cell)")
    parser.add_argument("--ops", type=int, help="timed ops per cell (default 3000, quick 300)")
    parser.add_argument("--block", type=int, help="ops per interleaved block (default 20)")
    parser.add_argument("--seed", type=int, default=20240602)
    parser.add_argument(
        "--bulk-rounds", type=int, help="rounds of the 10,000-row section (default 5, quick 2)"
    )
    args = parser.parse_args(argv)
    ops = args.ops or (300 if args.quick else 3000)
    block = args.block or 20
    _common.setup_django(DATABASE)
    with _common.bench_database():
        bench = Bench(ops, block, args.seed)
        bench.bulk_rounds = args.bulk_rounds or (2 if args.quick else 5)
        bench.run()
    return 0


class Bench:
    def __init__(self, ops: int, block: int, seed: int) -> None:
        from django.db import connections
        from rudderstack.analytics import Client

        from example_project.payouts.models import Payout
        from example_project.shops.models import Plan, Shop

        self.ops, self.block, self.seed = ops, block, seed
        self.connection = connections["default"]
        self.Payout = Payout
        self.sdk = Client(write_key="benchmark", host="http://127.0.0.1:9", send=False)
        self.sdk_calls = 0
        self.done: Counter[tuple[str, str]] = Counter()  # (variant, op) -> ops run
        plan = Plan.objects.create(name="Pro", monthly_price=Decimal("29.00"))
        # Tracked: records the shop's identify and traits digest, so that the Payout
        # changes' re-identify finds the traits unchanged and skips.
        from django.db import transaction

        with transaction.atomic():
            self.shop = Shop.objects.create(domain="bench.example", email="a@b.c", plan=plan)
        from django_cdp import tracking_disabled

        with tracking_disabled():
            self.pool = [
                Payout.objects.create(shop=self.shop, amount=AMOUNTS[0], currency="EUR")
                for _ in range(POOL)
            ]
        self.install_trigger_functions()
        self.cursor = Counter()  # per op kind: position in the pool / amount toggle
        self.bulk_created = self.bulk_updated = 0  # messages the bulk section expects
        self.expanded = 0  # deferred statements the bulk section expanded

    def install_trigger_functions(self) -> None:
        """Install the trigger engine's functions once, and keep its triggers' definitions.

        The trigger variants' blocks create the triggers and drop them afterwards. Settings
        changes would install everything again at every block (``CREATE OR REPLACE`` of each
        function), and a server process that redefines PL/pgSQL functions again and again
        grows by megabytes each time, which slowed every variant of a long run (and is not
        what an application does: ``migrate`` installs them once)."""
        from django.conf import settings
        from django.core.signals import setting_changed
        from django.test import override_settings

        from django_cdp.capture import triggers

        setting_changed.disconnect(triggers._reinstall_on_change)
        self.trigger_plan = {**settings.DJANGO_CDP, "CAPTURE": "triggers"}
        with override_settings(DJANGO_CDP=self.trigger_plan):
            triggers.install("default", force=True)
        table = self.Payout._meta.db_table
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE tgrelid = %s::regclass AND NOT tgisinternal",
                [table],
            )
            found = cursor.fetchall()
        self.create_triggers = [definition for _, definition in found]
        self.drop_triggers = [f'DROP TRIGGER "{name}" ON "{table}"' for name, _ in found]
        self.trigger_ddl(self.drop_triggers)

    def trigger_ddl(self, statements: list[str]) -> None:
        with self.connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)

    # --- variants --------------------------------------------------------------------------

    @contextlib.contextmanager
    def variant(self, name: str) -> Iterator[None]:
        from auditlog.registry import auditlog
        from django.db.models.signals import post_save

        from django_cdp import tracking_disabled
        from django_cdp.capture import signals as receivers

        if name == SIGNALS:
            yield
        elif name in (TRIGGERS, IN_REQUEST):
            # The same plan captured by triggers: its triggers created on entering (DDL outside
            # the timed ops), dropped on leaving, so that no other variant pays for them.
            from django.test import override_settings

            from django_cdp import scope

            request = (
                scope.enter(REQUEST_CONTEXT, "39ee7ea5-b6d8-4174-b612-04e1ef3fa952")
                if name == IN_REQUEST
                else contextlib.nullcontext()
            )
            with override_settings(DJANGO_CDP=self.trigger_plan), request:
                self.trigger_ddl(self.create_triggers)
                try:
                    yield
                finally:
                    self.trigger_ddl(self.drop_triggers)
        elif name == "signals, identify off":
            # What the re-identify's traits read costs a child change: the same plan with
            # "identify": False on Payout.
            from django.conf import settings
            from django.test import override_settings

            plan = settings.DJANGO_CDP
            models = {**plan["MODELS"]}
            models["payouts.Payout"] = {**models["payouts.Payout"], "identify": False}
            with override_settings(DJANGO_CDP={**plan, "MODELS": models}):
                yield
        elif name == "untracked":
            with tracking_disabled():
                yield
        elif name == "plain Django":
            receivers.disconnect()
            try:
                yield
            finally:
                receivers.connect()
        elif name == "auditlog":
            auditlog.register(self.Payout)
            try:
                with tracking_disabled():
                    yield
            finally:
                auditlog.unregister(self.Payout)
        elif name == "SDK track()":
            post_save.connect(self._sdk_receiver, sender=self.Payout, dispatch_uid="bench-sdk")
            try:
                with tracking_disabled():
                    yield
            finally:
                post_save.disconnect(sender=self.Payout, dispatch_uid="bench-sdk")
        else:
            raise ValueError(name)

    def _sdk_receiver(self, sender, instance, created, **kwargs) -> None:
        """What teams write today: send a track from ``post_save`` on every save."""
        self.sdk_calls += 1
        self.sdk.track(
            user_id=str(instance.shop_id),
            event="Payout Created" if created else "Payout Updated",
            properties={
                "id": instance.pk,
                "amount": instance.amount,
                "currency": instance.currency,
                "status": instance.status,
            },
        )

    # --- operations ------------------------------------------------------------------------

    def operation(self, op: str, mode: str) -> Callable[[int], object]:
        Payout, shop, pool = self.Payout, self.shop, self.pool

        def create(i: int) -> None:
            Payout.objects.create(shop=shop, amount=AMOUNTS[i % 2], currency="EUR", status="paid")

        def update(i: int) -> None:
            _common.toggle_amount(pool[i % POOL])

        return _common.in_mode(create if op == "create" else update, mode)

    def run_ops(
        self, variant: str, op: str, mode: str, n: int, timed: bool, *, entered: bool = False
    ) -> list[float]:
        """``n`` ops of one cell (``entered``: the caller is already inside the variant)."""
        func = self.operation(op, mode)
        start = self.cursor[op]
        self.cursor[op] += n
        with contextlib.nullcontext() if entered else self.variant(variant):
            out = _common.run_block(func, n, start, timed)
        self.done[variant, op] += n
        return out

    # --- SQL per op ------------------------------------------------------------------------

    def count_sql(self, variant: str, op: str, mode: str, k: int = 4) -> tuple[float, float, str]:
        """(statements per op, explicit transactions per op, the SQL of one op).

        ``CaptureQueriesContext`` lists cursor statements and, since Django 4.2, the
        ``BEGIN`` and ``COMMIT`` of explicit transactions: they are counted apart.
        """
        from django.test.utils import CaptureQueriesContext

        # Inside the variant: entering it is no part of an op (the triggers variant installs
        # its triggers then).
        with self.variant(variant):
            self.run_ops(variant, op, mode, 1, timed=False, entered=True)  # warm caches
            with CaptureQueriesContext(self.connection) as captured:
                self.run_ops(variant, op, mode, k, timed=False, entered=True)
            with CaptureQueriesContext(self.connection) as one:
                self.run_ops(variant, op, mode, 1, timed=False, entered=True)
        sql = [q["sql"] for q in captured.captured_queries]
        commits = sql.count("COMMIT")
        statements = len(sql) - commits - sql.count("BEGIN")
        text = "\n".join(_short(q["sql"]) for q in one.captured_queries)
        return statements / k, commits / k, text

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        cells = [(v, o, m) for m in MODES for o in OPS for v in VARIANTS]
        print(f"# django-cdp save path: {self.ops} timed ops per cell, blocks of {self.block}")
        print(f"# {_common.machine()}")
        print(
            f"# git {_common.git_revision()}, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
            f"load average {_common.load_average()} at start\n"
        )

        sql = {cell: self.count_sql(*cell) for cell in cells}

        rng = random.Random(self.seed)
        warm = list(cells)
        rng.shuffle(warm)
        for cell in warm:
            self.run_ops(*cell, 50, timed=False)

        blocks = [cell for cell in cells for _ in range(max(1, self.ops // self.block))]
        rng.shuffle(blocks)
        samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        started = time.monotonic()
        for cell in blocks:
            samples[cell] += self.run_ops(*cell, self.block, timed=True)
        elapsed = time.monotonic() - started

        self.report(cells, samples, sql, elapsed)
        self.expand_single_rows()
        self.bulk(self.bulk_rounds)
        self.breakdown(max(100, self.ops // 10))
        self.sanity_check()
        print(f"# load average {_common.load_average()} at the end")

    def expand_single_rows(self) -> None:
        """What delivery does later with the statements the trigger variants deferred (every
        single-row write, with ``DEFER_STATEMENT_ROWS = 1``): expand them, timed per message."""
        from django_cdp.capture import deferred
        from django_cdp.models import DeferredStatement, Message

        waiting = DeferredStatement.objects.count()
        if not waiting:
            return
        before = Message.objects.count()
        started = time.perf_counter()
        statements = deferred.expand()
        seconds = time.perf_counter() - started
        written = Message.objects.count() - before
        print(
            f"triggers: the timed ops deferred {waiting:,} statements; delivery's expansion "
            f"(not part of the write) turned {statements:,} of them into {written:,} messages "
            f"in {seconds:.1f} s: {seconds * 1e6 / max(written, 1):.0f} µs a message\n"
        )

    def bulk(self, rounds: int, rows: int = 10_000) -> None:
        """A ``QuerySet.update()`` of ``rows`` rows, a ``bulk_create`` of ``rows`` and a load
        of ``rows``: untracked, triggers, and the signal engine's bulk helpers, interleaved."""
        import django_cdp
        from django_cdp import tracking_disabled
        from django_cdp.capture import deferred
        from django_cdp.settings import cdp_settings

        Payout, shop = self.Payout, self.shop
        with tracking_disabled():
            Payout.objects.bulk_create(
                [Payout(shop=shop, amount=AMOUNTS[0], currency="EUR") for _ in range(rows)]
            )
        ids = list(Payout.objects.order_by("-id").values_list("id", flat=True)[:rows])
        table = Payout.objects.filter(id__in=ids)
        variants = ("untracked", TRIGGERS, SIGNALS)
        times: dict[tuple[str, str], list[float]] = defaultdict(list)
        rng = random.Random(self.seed)
        flip = 0

        def update(variant: str) -> None:
            nonlocal flip
            flip += 1
            amount = AMOUNTS[flip % 2]
            if variant == SIGNALS:
                django_cdp.queryset_update(table, amount=amount)
            else:
                table.update(amount=amount)

        def create(variant: str) -> None:
            new = [Payout(shop=shop, amount=AMOUNTS[1], currency="USD") for _ in range(rows)]
            (django_cdp.bulk_create if variant == SIGNALS else Payout.objects.bulk_create)(new)

        def load(variant: str) -> None:
            list(table.all())  # a new queryset: nothing cached

        for _ in range(rounds):
            order = [(v, op) for v in variants for op in ("update", "create", "load")]
            rng.shuffle(order)
            for variant, op in order:
                with self.variant(variant):
                    func = {"update": update, "create": create, "load": load}[op]
                    started = time.perf_counter()
                    func(variant)
                    times[variant, op].append((time.perf_counter() - started) * 1000)
                    if variant == TRIGGERS and op != "load":
                        # What delivery does later, off the write path: the statement the
                        # triggers deferred becomes its messages.
                        started = time.perf_counter()
                        expanded = deferred.expand()
                        times[variant, f"{op} expand"].append(
                            (time.perf_counter() - started) * 1000
                        )
                        self.expanded += expanded
                    if variant != "untracked" and op != "load":
                        if op == "update":
                            self.bulk_updated += rows
                        else:
                            self.bulk_created += rows
                if op == "create":
                    with tracking_disabled():
                        Payout.objects.filter(currency="USD").delete()
        print(f"## {rows:,} rows at once: median ms of {rounds} interleaved rounds\n")
        table_rows = []
        for variant in variants:
            row = [variant]
            for op in ("update", "create", "load"):
                base = _common.median(times["untracked", op])
                value = _common.median(times[variant, op])
                row += [f"{value:.0f}", f"{value / base:.2f}x"]
            table_rows.append(row)
        headers = ["variant", "QuerySet.update() ms", "ratio", "bulk_create ms", "ratio"]
        headers += ["load ms", "ratio"]
        print(_common.table(headers, table_rows))
        print(
            "\nsignals: django_cdp.queryset_update / django_cdp.bulk_create (the helpers record "
            "the messages); untracked and triggers: the ORM's own calls"
        )
        print(
            f"\ntriggers: each statement of {rows:,} rows was deferred (DEFER_STATEMENT_ROWS = "
            f"{cdp_settings.DEFER_STATEMENT_ROWS}); {self.expanded} deferred statements became "
            "their messages afterwards, as delivery does before it claims (not part of the "
            f"write): median {_common.median(times[TRIGGERS, 'update expand']):.0f} ms for an "
            f"update's, {_common.median(times[TRIGGERS, 'create expand']):.0f} ms for a "
            "bulk_create's\n"
        )

    def breakdown(self, n: int) -> None:
        """Where django-cdp's time goes: its recording steps timed one by one (median µs).

        The steps are wrapped by replacing the module attributes the signal engine
        looks them up in, for this pass only; the wrappers add about 1 µs each.
        """
        from django_cdp.capture import owners, signals

        targets = (
            (signals, "before_save"),
            (signals, "after_save"),
            (signals, "plan_identify"),
            (owners, "read_traits"),
            (signals, "store"),
            (signals, "insert"),
        )
        steps = tuple(name for _, name in targets)
        originals = {(module, name): getattr(module, name) for module, name in targets}
        times: dict[tuple[str, ...], list[float]] = defaultdict(list)
        clock = time.perf_counter_ns
        cell: list[str] = []  # the (op, mode) being measured

        def wrap(name: str, func: Callable) -> Callable:
            def timed(*args, **kwargs):
                t0 = clock()
                try:
                    return func(*args, **kwargs)
                finally:
                    times[(*cell, name)].append((clock() - t0) / 1000)

            return timed

        rows = []
        try:
            for (module, name), func in originals.items():
                setattr(module, name, wrap(name, func))
            for mode in MODES:
                for op in OPS:
                    cell[:] = [op, mode]
                    self.run_ops(SIGNALS, op, mode, n, timed=False)
                    medians = [times.get((op, mode, step)) for step in steps]
                    rows.append(
                        [f"{op}, {mode}"]
                        + [f"{_common.median(m):.0f}" if m else "-" for m in medians]
                    )
        finally:
            for (module, name), func in originals.items():
                setattr(module, name, func)
        print(f"## django-cdp: median µs per step ({n} ops each, not interleaved)\n")
        print(
            "before_save = pre_save (SELECT of the tracked columns on update); after_save = "
            "post_save, including plan_identify (read_traits + digest compare) and store / "
            "insert (the INSERT of a message row)\n"
        )
        print(_common.table(["op, mode", *steps], rows))
        print()

    def report(self, cells, samples, sql, elapsed: float) -> None:
        med = {cell: _common.median(samples[cell]) for cell in cells}
        for mode in MODES:
            rows = []
            for variant in VARIANTS:
                row = [variant]
                for op in OPS:
                    base = med[BASELINE, op, mode]
                    value = med[variant, op, mode]
                    statements, commits = sql[variant, op, mode][:2]
                    base_statements, base_commits = sql[BASELINE, op, mode][:2]
                    extra = _extra(statements - base_statements, commits - base_commits)
                    row += [
                        f"{value:.0f}",
                        f"{value - base:+.0f}",
                        f"{value / base:.2f}x",
                        extra,
                    ]
                rows.append(row)
            title = (
                "inside atomic() (one op per atomic block, commit included)"
                if mode == "atomic"
                else "autocommit (no enclosing transaction)"
            )
            print(f"## {title}: median µs per op\n")
            headers = ["variant"]
            for op in OPS:
                headers += [f"{op} µs", "Δ µs", "ratio", "extra SQL"]
            print(_common.table(headers, rows))
            print()

        print("## spread: p10 / p50 / p90 µs per cell\n")
        rows = []
        for variant in VARIANTS:
            row = [variant]
            for mode in MODES:
                for op in OPS:
                    data = sorted(samples[variant, op, mode])
                    p = [data[int(q * (len(data) - 1))] for q in (0.1, 0.5, 0.9)]
                    row.append(" / ".join(f"{x:.0f}" for x in p))
            rows.append(row)
        headers = ["variant"] + [f"{op} ({mode})" for mode in MODES for op in OPS]
        print(_common.table(headers, rows))
        print()

        print("## statements per op (cursor statements; BEGIN/COMMIT of explicit transactions)\n")
        for variant in ("untracked", SIGNALS, TRIGGERS, "auditlog", "SDK track()"):
            for mode in MODES:
                for op in OPS:
                    statements, commits, text = sql[variant, op, mode]
                    print(
                        f"### {variant}, {op}, {mode}: {statements:g} statements, "
                        f"{commits:g} explicit commits"
                    )
                    print("    " + text.replace("\n", "\n    "))
            print()
        n = sum(len(v) for v in samples.values())
        print(f"# {n} timed ops in {elapsed:.0f} s; block order shuffled (seed {self.seed})")
        print(
            "# SDK track(): rudderstack.analytics.Client(send=False, host=http://127.0.0.1:9): "
            "builds and sizes the message, never queues or sends"
        )

    def sanity_check(self) -> None:
        """Every tracked variant really emitted one message per op; nothing else did."""
        from auditlog.models import LogEntry

        from django_cdp.capture import deferred
        from django_cdp.models import Message

        deferred.expand()  # any statement still deferred: its messages are counted too
        events = Counter(
            Message.objects.filter(type="track").values_list("event", flat=True).iterator()
        )
        identifies = Message.objects.filter(type="identify").count()
        expected = {
            "Payout Created": sum(self.done[v, "create"] for v in TRACKED) + self.bulk_created,
            "Payout Updated": sum(self.done[v, "update"] for v in TRACKED) + self.bulk_updated,
            "Shop Created": 1,
        }
        audit = LogEntry.objects.count()
        audit_expected = self.done["auditlog", "create"] + self.done["auditlog", "update"]
        sdk_expected = self.done["SDK track()", "create"] + self.done["SDK track()", "update"]
        problems = []
        if dict(events) != expected:
            problems.append(f"django-cdp tracks {dict(events)} != expected {expected}")
        if identifies != 1:
            problems.append(f"{identifies} identifies (expected 1: the shop's, then skipped)")
        if audit != audit_expected:
            problems.append(f"{audit} auditlog entries != {audit_expected}")
        if self.sdk_calls != sdk_expected:
            problems.append(f"{self.sdk_calls} SDK track() calls != {sdk_expected}")
        print(
            f"# check: django-cdp wrote {events['Payout Created']} Payout Created, "
            f"{events['Payout Updated']} Payout Updated, {identifies} identify; "
            f"auditlog {audit} entries; SDK {self.sdk_calls} track() calls: "
            + ("OK" if not problems else "MISMATCH")
        )
        if problems:
            raise SystemExit("; ".join(problems))


def _extra(statements: float, commits: float) -> str:
    text = f"{statements:+g}"
    if commits:
        text += f" (+{commits:g} BEGIN/COMMIT)"
    return text


def _short(sql: str, limit: int = 160) -> str:
    return sql if len(sql) <= limit else sql[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
