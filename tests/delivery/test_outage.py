"""Outages are the data plane's, not the messages': a shared backoff, probes, no dead letters.

In-process tests drive ``drain()`` against loopback data planes; the last test is
the outage drill in small (``benchmarks/outage_recovery.py``): a real worker
process, a data plane answering 503 for 10 s while messages keep being written,
and the backlog delivered within seconds of its recovery.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db.models.functions import Now
from django.utils import timezone

from benchmarks.outage_recovery import OutageDataPlane
from django_cdp import delivery
from django_cdp.delivery import drain
from django_cdp.devserver import DataPlaneServer
from django_cdp.models import DeliveryEndpoint, Message
from tests.delivery.conftest import WRITE_KEY, cdp_config, make_messages, statuses, wait_until

pytestmark = pytest.mark.django_db


def _due() -> None:
    """Skip every backoff (the messages' and the data plane's)."""
    past = timezone.now() - timedelta(seconds=1)
    Message.objects.filter(status="pending").update(next_attempt_at=past)
    DeliveryEndpoint.objects.update(next_try_at=past)


@pytest.fixture
def outage() -> Any:
    server = OutageDataPlane(write_key=WRITE_KEY).start()
    yield server
    server.stop()


def test_a_long_outage_spends_one_attempt_and_dead_letters_nothing(settings, outage):
    settings.DJANGO_CDP = cdp_config(outage, MAX_ATTEMPTS=2, MAX_BATCH_MESSAGES=20)
    make_messages(50)
    outage.down.set()
    first = drain()
    assert (first.retrying, first.requests) == (20, 1)
    for _ in range(6):  # six probes, each of one small batch
        _due()
        probe = drain()
        assert (probe.retrying, probe.requests, probe.failed) == (
            delivery.PROBE_MESSAGES,
            1,
            0,
        )
    assert statuses() == {"pending": 50}
    assert max(Message.objects.values_list("attempts", flat=True)) == 1
    endpoint = DeliveryEndpoint.objects.get()
    assert endpoint.failures == 7 and endpoint.last_response_code == 503
    assert drain().waiting == 1  # backing off: nothing claimed, nothing sent
    outage.down.clear()
    _due()
    assert drain().sent == 50  # the probe is answered: the backlog flows at full size
    assert DeliveryEndpoint.objects.get().failures == 0


def test_only_one_worker_probes_at_a_time(settings, outage):
    settings.DJANGO_CDP = cdp_config(outage)
    make_messages(5)
    outage.down.set()
    drain()
    _due()
    run = delivery._Run("default", "w1")
    assert run.endpoint_turn() is delivery.Turn.PROBE
    assert delivery._Run("default", "w2").endpoint_turn() is delivery.Turn.WAIT


def test_cdp_deliver_by_hand_tries_even_while_the_data_plane_backs_off(settings, outage, capsys):
    settings.DJANGO_CDP = cdp_config(outage, RETRY_BACKOFF_BASE=60.0, RETRY_BACKOFF_MAX=3600.0)
    make_messages(3)
    outage.down.set()
    drain()
    outage.down.clear()
    DeliveryEndpoint.objects.update(next_try_at=timezone.now() + timedelta(minutes=10))
    Message.objects.update(next_attempt_at=Now())  # the claim's clock
    assert drain().waiting == 1
    call_command("cdp_deliver")
    assert "sent 3" in capsys.readouterr().out
    assert statuses() == {"sent": 3}


class PoisonDataPlane(DataPlaneServer):
    """Answers 500 to any request carrying one of ``poison`` (a message that breaks it)."""

    def __init__(self) -> None:
        super().__init__(write_key=WRITE_KEY)
        self.poison: set[str] = set()

    def _check(self, path: str, headers: dict[str, str], raw: bytes) -> Any:
        status, text, items, size = super()._check(path, headers, raw)
        if any(str(i.get("messageId")) in self.poison for i in items):
            return 500, "internal error", [], size
        return status, text, items, size


def test_a_message_failing_on_its_own_is_dead_lettered_while_others_go(settings):
    server = PoisonDataPlane().start()
    try:
        settings.DJANGO_CDP = cdp_config(server, MAX_ATTEMPTS=3, MAX_BATCH_MESSAGES=1)
        rows = make_messages(12)
        server.poison = {rows[0].message_id}
        for _ in range(20):
            drain()
            if Message.objects.get(pk=rows[0].pk).status == "failed":
                break
            _due()
        _due()
        drain()
        poisoned = Message.objects.get(pk=rows[0].pk)
        assert (poisoned.status, poisoned.attempts) == ("failed", 3)
        assert poisoned.last_error.startswith("gave up after 3 attempts: HTTP 500")
        assert statuses() == {"failed": 1, "sent": 11}
    finally:
        server.stop()


@pytest.mark.redis
def test_a_10_second_outage_is_delivered_within_seconds_of_recovery(start_worker, outage):
    """The drill in small: ten seconds of 503 while messages keep coming.

    With a message's own backoff (1 s, 3 s, 4 s ...) and 3 attempts, every message
    that met the outage would have been dead-lettered within about 8 s, and the
    backlog would wait for each message's backoff. Now only probes go out while the
    data plane fails, and the first probe after its recovery (at most 4 s, the
    data plane's backoff cap here) makes the whole backlog due.
    """
    cdp = cdp_config(
        outage,
        DELIVERY="celery",
        LEASE_SECONDS=10,
        READ_TIMEOUT=2.0,
        MAX_ATTEMPTS=3,
        RETRY_BACKOFF_BASE=1.0,
        RETRY_BACKOFF_MAX=4.0,
    )
    start_worker(cdp, sweep=0.5)
    writing = threading.Event()
    writing.set()

    def write() -> None:
        while writing.is_set():
            make_messages(2)
            time.sleep(0.1)

    writer = threading.Thread(target=write)
    outage.down.set()
    writer.start()
    try:
        assert wait_until(lambda: outage.refused >= 2, 20.0)  # failed, then probed
        time.sleep(10.0)  # the outage itself: ten seconds of writes and probes
        outage.down.clear()
        recovered = time.monotonic()
        backlog = list(Message.objects.values_list("message_id", flat=True))
        assert wait_until(lambda: set(backlog) <= set(outage.message_ids()), 30.0, interval=0.1), (
            statuses()
        )
        elapsed = time.monotonic() - recovered
    finally:
        writing.clear()
        writer.join(10)
    assert len(backlog) > 100 and elapsed < 8.0, (len(backlog), elapsed)
    assert "failed" not in statuses()
    assert max(Message.objects.values_list("attempts", flat=True)) <= 2
