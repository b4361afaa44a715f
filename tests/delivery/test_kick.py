"""The kick after commit: debounced, published off the request thread, never raising or stalling."""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from django_cdp import kick
from tests.delivery.conftest import wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def publisher(monkeypatch) -> Iterator[kick.Publisher]:
    """A fresh publisher for each test (no debounce state, no thread, no connection)."""
    fresh = kick.Publisher()
    monkeypatch.setattr(kick, "_publisher", fresh)
    yield fresh
    # Its thread outlives the test: leave it idle, not retrying against some other broker.
    fresh._publish = lambda using, app: None
    with fresh._cond:
        fresh._waiting.clear()


@pytest.fixture
def published(monkeypatch) -> list[tuple[str, float]]:
    """What the publisher thread publishes, as (alias, monotonic time), instead of a broker."""
    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(
        kick.Publisher, "_publish", lambda self, using, app: calls.append((using, time.monotonic()))
    )
    return calls


@pytest.fixture
def connecting_threads(monkeypatch) -> list[int]:
    """The threads that open a broker connection (the real connection is still opened)."""
    threads: list[int] = []
    connect = kick.Publisher._connect

    def spy(app):
        threads.append(threading.get_ident())
        return connect(app)

    monkeypatch.setattr(kick.Publisher, "_connect", staticmethod(spy))
    return threads


@pytest.fixture
def unreachable_broker():
    """A Celery app, current in this process, whose broker refuses connections."""
    from celery import Celery, _state

    app = Celery("unreachable", broker="redis://127.0.0.1:9/0", set_as_current=False)
    app.set_current()
    yield app
    _state.default_app.set_current()


def test_manual_mode_publishes_nothing(configure, published, publisher):
    configure(DELIVERY="manual")
    kick.request_delivery("default")
    assert publisher._thread is None and published == []


def test_debounced_per_alias_and_every_commit_is_covered(configure, published):
    configure(DELIVERY="celery", KICK_DEBOUNCE_SECONDS=0.5)
    started = time.monotonic()
    kick.request_delivery("default")
    kick.request_delivery("other")
    assert wait_until(lambda: len(published) == 2, 5)
    for _ in range(50):  # after the first run was published: they need one more run
        kick.request_delivery("default")
    assert wait_until(lambda: len(published) == 3, 5)
    assert [alias for alias, _ in published] == ["default", "other", "default"]
    assert published[0][1] - started < 0.25  # at once after a quiet period
    assert published[2][1] - started >= 0.5  # one run per debounce period


def test_debounce_schedule_is_exact():
    state: dict[str, tuple[float, float]] = {}
    assert kick._next_kick(state, "a", 10.0, 1.0) == 10.0
    # The run published at 10.0 may already have looked: the next run is at 11.0.
    assert kick._next_kick(state, "a", 10.0, 1.0) == 11.0
    assert kick._next_kick(state, "a", 10.2, 1.0) is None  # the run at 11.0 covers it
    assert kick._next_kick(state, "a", 10.9, 1.0) is None
    assert kick._next_kick(state, "a", 11.2, 1.0) == 12.0
    assert kick._next_kick(state, "a", 15.0, 1.0) == 15.0  # quiet for a while: at once


def test_unreachable_broker_costs_the_request_nothing_and_is_logged_once(
    configure, unreachable_broker, publisher, caplog, connecting_threads
):
    configure(DELIVERY="celery", KICK_DEBOUNCE_SECONDS=0.0)
    with caplog.at_level(logging.INFO, "django_cdp.kick"):
        for _ in range(200):
            kick.request_delivery("default")
        assert wait_until(lambda: "could not ask a worker to deliver" in caplog.text, 5)
        # The publisher's thread tried the broker; the requests' thread never did.
        assert connecting_threads
        assert threading.get_ident() not in connecting_threads
        # The kick is kept for the next attempt; commits meanwhile join it.
        assert list(publisher._waiting) == ["default"]
        kick.request_delivery("default")
        assert list(publisher._waiting) == ["default"]
    assert caplog.text.count("could not ask a worker to deliver") == 1


@pytest.mark.redis
def test_the_request_thread_does_no_broker_io(
    configure, celery_app_for_kicks, queue_name, connecting_threads
):
    """200 commits that each ask for a run leave the broker to the publisher's thread (its
    cost to the request is measured in benchmarks/kick_cost.py)."""
    import redis

    configure(DELIVERY="celery", QUEUE=queue_name, KICK_DEBOUNCE_SECONDS=0.0)
    broker = redis.Redis.from_url(celery_app_for_kicks.conf.broker_url)
    try:
        for _ in range(200):
            kick.request_delivery("default")
        assert wait_until(lambda: broker.llen(queue_name) >= 1, 5)  # the kicks were published
        assert connecting_threads
        assert threading.get_ident() not in connecting_threads
    finally:
        broker.delete(queue_name)


def test_failed_kick_is_retried_until_published_and_logged_once(
    configure, monkeypatch, publisher, caplog
):
    """The promise of a kick survives a broker outage: it is published once the broker answers."""
    monkeypatch.setattr(kick, "RETRY_SECONDS", 0.05)
    attempts: list[float] = []

    def publish(self, using: str, app: object) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(kick.Publisher, "_publish", publish)
    configure(DELIVERY="celery")
    with caplog.at_level(logging.INFO, "django_cdp.kick"):
        kick.request_delivery("default")
        assert wait_until(lambda: "broker answers again" in caplog.text, 5)
    assert len(attempts) == 4 and not publisher._waiting
    assert all(b - a >= 0.05 for a, b in itertools.pairwise(attempts))
    assert caplog.text.count("could not ask a worker to deliver") == 1


def test_flush_publishes_waiting_kicks_at_once(configure, published, publisher):
    """At exit, a kick waiting for its debounce slot is published instead of lost."""
    configure(DELIVERY="celery", KICK_DEBOUNCE_SECONDS=60.0)
    kick.request_delivery("default")
    assert wait_until(lambda: len(published) == 1, 5)
    kick.request_delivery("default")  # due in 60 s
    assert list(publisher._waiting) == ["default"]
    publisher.flush(5.0)
    assert len(published) == 2 and not publisher._waiting


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_gets_its_own_publisher(configure, published, publisher):
    """A child forked while the parent's publisher lock is held still kicks (prefork, --preload)."""
    configure(DELIVERY="celery", KICK_DEBOUNCE_SECONDS=0.0)
    kick.request_delivery("default")
    assert wait_until(lambda: len(published) == 1, 5)  # the parent's thread runs
    read_end, write_end = os.pipe()
    with publisher._cond:  # another thread of the parent holds the lock at the fork
        pid = os.fork()
        if pid == 0:  # the child: its own publisher, thread and lock
            try:
                child = kick._publisher
                kick.request_delivery("default")
                ok = child is not publisher and wait_until(lambda: len(published) == 2, 5)
                os.write(write_end, b"ok" if ok else b"no")
            finally:
                os._exit(0)
    os.close(write_end)
    try:
        answered = select.select([read_end], [], [], 10)[0]
        if not answered:
            os.kill(pid, signal.SIGKILL)
        assert answered, "the child hung"
        assert os.read(read_end, 2) == b"ok"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
