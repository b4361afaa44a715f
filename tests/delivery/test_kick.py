"""The kick after commit: debounced, never raising, never stalling."""

from __future__ import annotations

import logging
import time

import pytest

from django_cdp import delivery

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_state():
    delivery._kick_state.clear()
    yield
    delivery._kick_state.clear()


@pytest.fixture
def published(monkeypatch):
    calls = []
    monkeypatch.setattr(
        delivery, "_publish", lambda task, using, countdown: calls.append((using, countdown))
    )
    return calls


def test_manual_mode_publishes_nothing(configure, published):
    configure(DELIVERY="manual")
    delivery.request_delivery("default")
    assert published == []


def test_debounced_per_alias_and_every_commit_is_covered(configure, published):
    configure(DELIVERY="celery", KICK_DEBOUNCE_SECONDS=0.5)
    for _ in range(50):
        delivery.request_delivery("default")
    delivery.request_delivery("other")
    # One run now; commits after it was published join one more run a debounce later
    # (less the time the loop took: the exact schedule is pinned by the next test).
    assert [alias for alias, _ in published] == ["default", "default", "other"]
    assert published[0][1] == 0.0 and published[2][1] == 0.0
    assert 0.0 < published[1][1] <= 0.5


def test_debounce_schedule_is_exact():
    assert delivery._next_kick("a", 10.0, 1.0) == 0.0
    # The run published at 10.0 may already have looked: the next run is at 11.0.
    assert delivery._next_kick("a", 10.0, 1.0) == 1.0
    assert delivery._next_kick("a", 10.2, 1.0) is None  # the run at 11.0 covers it
    assert delivery._next_kick("a", 10.9, 1.0) is None
    assert delivery._next_kick("a", 11.2, 1.0) == pytest.approx(0.8)  # at 12.0
    assert delivery._next_kick("a", 15.0, 1.0) == 0.0  # quiet for a while: at once


def test_unreachable_broker_is_logged_fast_and_tried_once_per_debounce(configure, caplog):
    from celery import Celery, _state

    app = Celery("unreachable", broker="redis://127.0.0.1:9/0", set_as_current=False)
    app.set_current()
    try:
        configure(DELIVERY="celery", KICK_DEBOUNCE_SECONDS=0.3)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "django_cdp.delivery"):
            for _ in range(20):
                delivery.request_delivery("default")
            assert time.monotonic() - started < 1.5
            assert caplog.text.count("could not ask a worker to deliver") == 1
            time.sleep(0.35)
            delivery.request_delivery("default")  # the next period tries again
        assert caplog.text.count("could not ask a worker to deliver") == 2
    finally:
        _state.default_app.set_current()
