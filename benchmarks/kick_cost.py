"""What the kick costs the committing thread: time spent in ``request_delivery`` (issue 10).

Run from the repository root, with Redis on 127.0.0.1:6379::

    .venv/bin/python benchmarks/kick_cost.py
    .venv/bin/python benchmarks/kick_cost.py --calls 500

Each cell calls ``django_cdp.kick.request_delivery("default")`` ``--calls`` times
at 200 calls a second (as after 200 commits a second) and times each call in the
calling thread:

* **broker up**: Redis database 14 on 127.0.0.1:6379 (the queue is deleted at the end);
* **broker down**: a loopback port nobody listens on (connections are refused);
* ``KICK_DEBOUNCE_SECONDS`` **0** (every commit asks for a run: the worst case)
  and **0.25** (the default).

Only the calling thread is timed: a publisher thread's broker I/O is what the
request no longer pays. Results go to ``docs/benchmarks.md`` under "Kick cost".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402

BROKER_UP = "redis://127.0.0.1:6379/14"
QUEUE = "cdp-kick-bench"
RATE = 200.0


def closed_port() -> int:
    """A loopback port with no listener: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cell(broker: str, debounce: float, calls: int) -> list[float]:
    """Microseconds of each ``request_delivery`` call, in a fresh process state for ``broker``."""
    from celery import Celery
    from django.conf import settings

    from django_cdp import kick
    from django_cdp.settings import cdp_settings

    app = Celery("cdp_kick_bench", broker=broker, set_as_current=False)
    app.set_current()
    kick._publisher = kick.Publisher()  # fresh: no debounce state, no connection
    # Set directly: override_settings(DJANGO_CDP=...) would re-install capture triggers.
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "KICK_DEBOUNCE_SECONDS": debounce}
    cdp_settings.reload()
    durations = []
    start = time.monotonic()
    for i in range(calls):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        began = time.perf_counter_ns()
        kick.request_delivery("default")
        durations.append((time.perf_counter_ns() - began) / 1000)
    kick._publisher.flush(2.0)
    return durations


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.delivery_settings"
    os.environ["CDP_BENCH_CDP"] = json.dumps({"DELIVERY": "celery", "QUEUE": QUEUE})
    import django

    django.setup()
    import redis

    down = f"redis://127.0.0.1:{closed_port()}/0"
    print(f"# load average {_common.load_average()}; git {_common.git_revision()}", flush=True)
    rows = []
    try:
        for label, broker in (("up", BROKER_UP), ("down (refused)", down)):
            for debounce in (0.0, 0.25):
                us = run_cell(broker, debounce, args.calls)
                rows.append(
                    [
                        label,
                        f"{debounce:g}",
                        f"{percentile(us, 50):,.1f}",
                        f"{percentile(us, 95):,.1f}",
                        f"{max(us):,.0f}",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    finally:
        redis.Redis.from_url(BROKER_UP).delete(QUEUE)
    print(f"# load average {_common.load_average()}\n")
    print(
        _common.table(
            ["broker", "KICK_DEBOUNCE_SECONDS", "p50 µs", "p95 µs", "max µs"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
