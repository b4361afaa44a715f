"""Celery tasks: ``deliver`` drains the outbox; it is both the kick and the sweep.

The task is a ``shared_task``, so it binds to the project's own Celery app.
It runs on the default queue unless ``DJANGO_CDP["QUEUE"]`` names another
(applied to every publish, including beat's). It is idempotent: the claim in
:mod:`django_cdp.delivery` lets any number of concurrent runs share the work.

Retry delays live in the rows' ``next_attempt_at``, never in a Celery countdown
(long countdowns are redelivered in a loop by Redis once they pass its
visibility timeout), so the periodic sweep is what picks retries up. Add it to
the beat schedule::

    from django_cdp.tasks import BEAT_SCHEDULE as CDP_BEAT_SCHEDULE

    CELERY_BEAT_SCHEDULE = {**CDP_BEAT_SCHEDULE}   # plus your own entries

which is::

    CELERY_BEAT_SCHEDULE = {
        "django-cdp-sweep": {
            "task": "django_cdp.tasks.deliver",
            "schedule": 30.0,
            "options": {"expires": 25.0},
        },
        "django-cdp-purge": {
            "task": "django_cdp.tasks.purge",
            "schedule": 86400.0,
            "options": {"expires": 3600.0},
        },
    }

``purge`` deletes sent and skipped messages older than ``RETENTION_DAYS`` once
a day (see :mod:`django_cdp.retention`).

Workers should also take :data:`WORKER_SETTINGS` (``app.conf.update(WORKER_SETTINGS)``), so
that delivery resumes within seconds when the broker comes back from an outage.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from django_cdp.settings import cdp_settings

#: The name of the delivery task (kicks and sweeps).
DELIVER_TASK = "django_cdp.tasks.deliver"

#: Seconds between sweeps.
SWEEP_INTERVAL = 30.0

#: Seconds between retention purges.
PURGE_INTERVAL = 24 * 3600.0

#: Ready-made beat entry for the sweep. ``expires`` drops sweeps that queue up
#: while no worker runs; the next one does the same work.
BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "django-cdp-sweep": {
        "task": DELIVER_TASK,
        "schedule": SWEEP_INTERVAL,
        "options": {"expires": SWEEP_INTERVAL - 5},
    },
    "django-cdp-purge": {
        "task": "django_cdp.tasks.purge",
        "schedule": PURGE_INTERVAL,
        "options": {"expires": 3600.0},
    },
}


#: Celery settings for the project's workers, for ``app.conf.update(WORKER_SETTINGS)`` after
#: ``config_from_object``: a consumer that reconnects to a lost broker at least every 2 s and
#: queues a sweep on each (re)connection (see :mod:`django_cdp.worker`), and no limit on
#: reconnection attempts (Celery's default, 100, would end the worker after about 3 minutes
#: of outage at that pace).
WORKER_SETTINGS: dict[str, Any] = {
    "worker_consumer": "django_cdp.worker:Consumer",
    "broker_connection_max_retries": None,
}


class DeliverTask(Task):
    """Routes every publish to ``DJANGO_CDP["QUEUE"]`` unless a queue is given."""

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        queue = cdp_settings.QUEUE
        if queue and "queue" not in options:
            options["queue"] = queue
        return super().apply_async(args, kwargs, **options)


@shared_task(name=DELIVER_TASK, base=DeliverTask, ignore_result=True)
def deliver(using: str = "default") -> dict[str, int]:
    """Drain the outbox of database ``using`` for at most ``DELIVERY_TIME_BUDGET`` seconds.

    The budget keeps one run from holding a worker forever under a steady
    stream; what is left is picked up by the next kick or sweep.
    """
    from django_cdp.delivery import drain

    return drain(using=using, time_budget=float(cdp_settings.DELIVERY_TIME_BUDGET)).as_dict()


@shared_task(name="django_cdp.tasks.purge", base=DeliverTask, ignore_result=True)
def purge(using: str = "default") -> dict[str, int]:
    """Delete sent and skipped messages older than ``RETENTION_DAYS`` (0 keeps them forever).

    The outbox doubles as the delivery log and grows by every message; this
    keeps it to the window the admin needs. Pending, failed and blocked
    messages are never deleted by age.
    """
    import datetime

    from django_cdp.retention import purge as purge_messages

    days = int(cdp_settings.RETENTION_DAYS)
    if days <= 0:
        return {"deleted": 0, "batches": 0}
    result = purge_messages(datetime.timedelta(days=days), using=using)
    return {"deleted": result.deleted, "batches": result.batches}
