"""Settings of the delivery benchmark: ``benchmarks.settings`` plus a data plane and broker.

``CDP_BENCH_CDP`` (JSON) is merged into ``DJANGO_CDP`` so that the benchmark
driver and its Celery worker processes share the data plane URL, write key and
queue chosen at run time.
"""

import json
import os

from benchmarks.settings import *  # noqa: F403
from benchmarks.settings import DJANGO_CDP

DJANGO_CDP = {**DJANGO_CDP, **json.loads(os.environ.get("CDP_BENCH_CDP", "{}"))}
