"""The kick: after a commit that wrote messages, ask a Celery worker to deliver soon.

:func:`request_delivery` runs in the committing thread (a robust ``on_commit``
callback), so it must cost that thread nothing and never fail it. It only
decides *when* a run is due (debounced per alias, see :func:`_next_kick`),
notes it in a small table and wakes this process's publisher thread; the
publisher does the broker I/O over one kept connection. Publishing in the
request thread cost a new broker connection per publish (5-7 ms p50), and a
stopped broker cost every request a refused connection.

The kick is an optimisation: the messages are already safe in the outbox, and
the periodic sweep (``django_cdp.tasks.BEAT_SCHEDULE``) delivers whatever a
kick missed. Still, a kick the publisher could not send (broker down) is kept
and tried again every :data:`RETRY_SECONDS`, so that delivery resumes as soon
as the broker is back instead of at the next sweep; kicks of one alias that
wait meanwhile are one kick.

The publisher thread is started on first use in each process and replaced by
a fresh, idle one in a forked child (Celery prefork, gunicorn ``--preload``):
a child never touches its parent's connection or lock. At interpreter exit the
kicks still waiting are published (at most one broker attempt), so that a
management command that commits and exits still kicks.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from typing import Any

from celery import current_app

from django_cdp.settings import cdp_settings
from django_cdp.tasks import DELIVER_TASK

logger = logging.getLogger("django_cdp.kick")

#: Connect and socket timeout of the publisher's broker connection, in seconds.
KICK_CONNECT_TIMEOUT = 1.0
#: A kick not picked up within this many seconds is dropped by the broker; the sweep covers it.
KICK_EXPIRES = 300
#: While the broker cannot be reached, a waiting kick is tried again this often.
RETRY_SECONDS = 1.0
#: At interpreter exit, waiting kicks may hold the process at most this long.
EXIT_FLUSH_SECONDS = 2.0


def _next_kick(
    state: dict[str, tuple[float, float]], using: str, now: float, debounce: float
) -> float | None:
    """Monotonic time a new run is due, or ``None`` when an unstarted run already covers now.

    ``state`` maps an alias to (when its last run was due, earliest time of the
    next one). At most one run per ``debounce`` seconds per alias, and every
    commit is followed by a run that starts after it: a commit while a run is
    still waiting joins that run; a later one takes the next slot.
    """
    due, next_slot = state.get(using, (float("-inf"), float("-inf")))
    if due > now:
        return None
    at = max(now, next_slot)
    state[using] = (at, at + debounce)
    return at


class Publisher:
    """This process's kicks: the debounce table, the kicks waiting, and the thread sending them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: alias -> (when its last run was due, earliest time of the next), see _next_kick
        self._schedule: dict[str, tuple[float, float]] = {}
        #: alias -> (monotonic time its run is due, the Celery app to publish it with)
        self._waiting: dict[str, tuple[float, Any]] = {}
        #: aliases being published now; a commit meanwhile needs a run of its own
        self._sending: set[str] = set()
        self._thread: threading.Thread | None = None
        self._flushing = False
        self._failing = False
        self._app: Any = None
        self._conn: Any = None

    def request(self, using: str, debounce: float) -> None:
        """Note that ``using`` needs a run and wake the thread; no I/O (the committing thread)."""
        now = time.monotonic()
        with self._cond:
            if using in self._waiting:
                return  # a run not yet published starts after this commit
            due = _next_kick(self._schedule, using, now, debounce)
            if due is None:
                return
            # Celery's current app is per thread: the one of the committing thread, as before.
            self._waiting[using] = (due, current_app._get_current_object())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="django-cdp-kick", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float) -> None:
        """Publish the waiting kicks now; return when done, after one failed attempt, or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._thread is None:
                return
            self._flushing = True
            self._cond.notify()
            try:
                while (self._waiting or self._sending) and not self._failing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(left)
            finally:
                self._flushing = False

    def _run(self) -> None:
        while True:
            with self._cond:
                ready = self._take_due()
                while not ready:
                    wake = min((due for due, _ in self._waiting.values()), default=None)
                    self._cond.wait(None if wake is None else max(wake - time.monotonic(), 0))
                    ready = self._take_due()
            for using, app in ready:
                self._send(using, app)

    def _take_due(self) -> list[tuple[str, Any]]:
        """Move the runs due (all when flushing) to ``_sending``; called with the lock held.

        From here on a commit is no longer covered by the run: once published,
        it may already have looked at the outbox.
        """
        now = time.monotonic()
        ready = [
            (using, app)
            for using, (due, app) in self._waiting.items()
            if self._flushing or due <= now
        ]
        for using, _ in ready:
            del self._waiting[using]
            self._sending.add(using)
        return ready

    def _send(self, using: str, app: Any) -> None:
        try:
            self._publish(using, app)
        except Exception as exc:
            self._drop_connection()
            with self._cond:
                was_failing, self._failing = self._failing, True
                self._sending.discard(using)
                retry = time.monotonic() + RETRY_SECONDS
                self._waiting[using] = (min(retry, self._waiting.get(using, (retry,))[0]), app)
                self._cond.notify_all()
            if not was_failing:
                logger.warning(
                    "django-cdp: could not ask a worker to deliver (%s: %s); trying again every "
                    "%g s, and the periodic sweep will deliver the messages",
                    type(exc).__name__,
                    exc,
                    RETRY_SECONDS,
                )
            return
        with self._cond:
            was_failing, self._failing = self._failing, False
            self._sending.discard(using)
            self._cond.notify_all()
        if was_failing:
            logger.info("django-cdp: the broker answers again; asked a worker to deliver")

    def _publish(self, using: str, app: Any) -> None:
        """Publish one run of ``deliver`` over the kept connection, once, without Celery's retries.

        A kept connection may have died since its last use (broker restarted):
        then one fresh connection is tried before the kick counts as failed.
        """
        reused = self._conn is not None and self._app is app
        if not reused:
            self._drop_connection()
            self._conn = self._connect(app)
            self._app = app
        try:
            app.tasks[DELIVER_TASK].apply_async(
                kwargs={"using": using}, retry=False, connection=self._conn, expires=KICK_EXPIRES
            )
        except Exception:
            if not reused:
                raise
            self._drop_connection()
            self._publish(using, app)

    @staticmethod
    def _connect(app: Any) -> Any:
        conn = app.connection_for_write(connect_timeout=KICK_CONNECT_TIMEOUT)
        options: dict[str, Any] = {"max_retries": 0}
        if conn.transport.driver_type == "redis":
            options.update(
                socket_timeout=KICK_CONNECT_TIMEOUT, socket_connect_timeout=KICK_CONNECT_TIMEOUT
            )
        conn.transport_options = {**conn.transport_options, **options}
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = None


_publisher = Publisher()


def _new_publisher_after_fork() -> None:
    # The parent's thread does not exist here and its lock may have been held at the fork.
    global _publisher
    _publisher = Publisher()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_publisher_after_fork)


@atexit.register
def _flush_at_exit() -> None:
    _publisher.flush(EXIT_FLUSH_SECONDS)


def request_delivery(using: str = "default") -> None:
    """Ask a Celery worker to deliver soon; called after a commit that wrote messages.

    Never raises and never blocks: the broker I/O happens in the publisher
    thread. Does nothing unless ``DELIVERY == "celery"``.
    """
    try:
        if cdp_settings.DELIVERY != "celery":
            return
        _publisher.request(using, float(cdp_settings.KICK_DEBOUNCE_SECONDS))
    except Exception as exc:
        logger.warning(
            "django-cdp: could not ask a worker to deliver (%s: %s); the periodic sweep "
            "will deliver the messages",
            type(exc).__name__,
            exc,
        )
