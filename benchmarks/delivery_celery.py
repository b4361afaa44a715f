"""The Celery app of the delivery benchmark (``celery -A benchmarks.delivery_celery worker``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.delivery_settings")

app = Celery("cdp_bench")
app.conf.update(
    broker_url=os.environ.get("CDP_BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"),
    imports=("django_cdp.tasks",),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)
