"""A Celery worker consumer that resumes delivery within seconds of a broker outage.

Enable it with the worker settings in :data:`django_cdp.tasks.WORKER_SETTINGS`
(``worker_consumer = "django_cdp.worker:Consumer"``). It changes two things:

* **Reconnect interval.** Celery 5.7's consumer retries a lost broker
  connection with kombu's defaults, 2, 4, 6 … seconds apart up to 30 s,
  and no setting changes that (``broker_transport_options`` intervals only
  apply to publishing and channel revival, not to the consumer's own
  reconnect loop). A worker thus noticed a broker back after a 20 s outage
  up to 10 s late, after a minute's up to 16 s, later up to 30 s. This
  consumer retries at least every :data:`RECONNECT_INTERVAL_MAX` seconds.
* **A sweep on every (re)connection.** Beat's sweeps fail while the broker is
  down, and the messages committed meanwhile wait for the next one (up to
  ``SWEEP_INTERVAL``). The consumer publishes one ``deliver`` run each time
  it connects, so those messages go out as soon as a worker is back.

This module imports Celery's worker machinery (about 0.15 s): only worker
processes load it, through the setting's dotted path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from django_cdp.tasks import BEAT_SCHEDULE, DELIVER_TASK

logger = logging.getLogger("django_cdp.worker")

#: Longest wait, in seconds, between two attempts to reach a lost broker.
RECONNECT_INTERVAL_MAX = 2.0


class Consumer(CeleryConsumer):
    """Celery's consumer, reconnecting at least every 2 s and sweeping on each connection."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_INTERVAL_MAX / 2,
            interval_step=RECONNECT_INTERVAL_MAX / 2,
            interval_max=RECONNECT_INTERVAL_MAX,
        )
        return super().ensure_connected(conn)

    def connect(self) -> Any:
        conn = super().connect()
        try:
            self.app.tasks[DELIVER_TASK].apply_async(**BEAT_SCHEDULE["django-cdp-sweep"]["options"])
            logger.info("django-cdp: connected to the broker; queued a sweep of the outbox")
        except Exception as exc:  # the consumer must start anyway; beat's sweep follows
            logger.warning(
                "django-cdp: could not queue a sweep after connecting to the broker (%s: %s)",
                type(exc).__name__,
                exc,
            )
        return conn
