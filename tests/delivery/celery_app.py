"""The Celery app of the delivery tests, as a project would define it.

``celery -A tests.delivery.celery_app worker`` runs a real worker with
``django_cdp.tasks``; the test process imports the same app to publish kicks.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.delivery.settings_worker")

BROKER_URL = os.environ.get("CDP_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")

app = Celery("cdp_tests")
app.conf.update(
    broker_url=BROKER_URL,
    imports=("django_cdp.tasks",),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)
_sweep = float(os.environ.get("CDP_WORKER_SWEEP", "0") or 0)
if _sweep:
    app.conf.beat_schedule = {
        "django-cdp-sweep": {
            "task": "django_cdp.tasks.deliver",
            "schedule": _sweep,
            "options": {"expires": max(_sweep * 2, 1.0)},
        }
    }
