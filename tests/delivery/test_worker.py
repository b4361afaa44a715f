"""Fault tests with real components: Celery worker processes, Redis, the loopback data plane.

Each test starts its own worker(s) on a queue of its own (``QUEUE`` routing is
exercised on the way) against the test's committed database. Short delays come
from the settings, so the whole module stays well under two minutes.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from django_cdp import delivery, retention
from django_cdp import kick as kick_module
from django_cdp.devserver import DataPlaneServer
from django_cdp.models import Message
from tests.delivery.conftest import (
    WRITE_KEY,
    cdp_config,
    make_messages,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.redis

# Generous upper bounds; the tests finish as soon as the condition holds.
ARRIVAL_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _fresh_kicks(monkeypatch):
    monkeypatch.setattr(kick_module, "_publisher", kick_module.Publisher())


@pytest.fixture
def kick(celery_app_for_kicks, configure, queue_name):
    """Kick delivery from this process as the outbox writer does after a commit."""
    configure(DELIVERY="celery", QUEUE=queue_name, KICK_DEBOUNCE_SECONDS=0.0)

    def run() -> None:
        kick_module.request_delivery("default")

    return run


def worker_cdp(data_plane, **overrides):
    options = {"DELIVERY": "celery", "LEASE_SECONDS": 5, "READ_TIMEOUT": 2.0, **overrides}
    return cdp_config(data_plane, **options)


def wait_statuses(expected: dict[str, int], timeout: float = ARRIVAL_TIMEOUT) -> dict[str, int]:
    return wait_until(lambda: statuses() == expected and statuses(), timeout) or statuses()


def _refusals_recorded(worker) -> int:
    """401 answers the worker has recorded (logged after each outcome's commit)."""
    return worker.output().count("refused the write key")


def sent_counts(worker) -> int:
    return sum(int(n) for n in re.findall(r"'sent': (\d+)", worker.output()))


def test_normal_delivery_one_batch_exact_json(start_worker, data_plane, kick):
    rows = make_messages(8) + make_messages(2, kind="identify")
    start_worker(worker_cdp(data_plane))
    kick()
    assert data_plane.wait_for(10, ARRIVAL_TIMEOUT)
    assert wait_statuses({"sent": 10}) == {"sent": 10}
    assert len(data_plane.requests) == 1
    request = data_plane.requests[0]
    assert (request.path, request.status) == ("/v1/batch", 200)
    assert request.headers["content-encoding"] == "gzip"
    for row, message in zip(rows, data_plane.messages, strict=True):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", message.pop("sentAt"))
        assert message == json.loads(row.payload)
        assert "timestamp" not in message and "originalTimestamp" in message


def test_503_for_a_while_then_recovers(start_worker, data_plane, kick):
    rows = make_messages(30)
    data_plane.status_sequence.extend([503, 503, 503])
    start_worker(worker_cdp(data_plane), sweep=0.3)
    kick()
    assert data_plane.wait_for(30, ARRIVAL_TIMEOUT)
    assert wait_statuses({"sent": 30}) == {"sent": 30}
    expected = sorted(r.message_id for r in rows)
    assert sorted(data_plane.message_ids()) == expected  # each exactly once
    first, *probes = [r for r in data_plane.requests if r.status == 503]
    assert sorted(first.message_ids) == expected and len(probes) == 2
    # While the data plane failed, only small probes went out, and gave their attempt back:
    # every message counts the request that met the outage and the one that delivered it.
    assert all(0 < len(r.message_ids) <= delivery.PROBE_MESSAGES for r in probes)
    assert set(Message.objects.values_list("attempts", flat=True)) == {2}
    assert set(Message.objects.values_list("message_id", flat=True)) == set(expected)


def test_429_retry_after_is_honoured(start_worker, data_plane, kick):
    make_messages(5)
    data_plane.status_sequence.append(429)
    data_plane.retry_after = "2"
    start_worker(worker_cdp(data_plane), sweep=0.2)
    kick()
    assert data_plane.wait_for(5, ARRIVAL_TIMEOUT)
    first, second = data_plane.requests[:2]
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 1.9
    assert wait_statuses({"sent": 5}) == {"sent": 5}


def test_poisoned_message_in_a_batch_of_100(start_worker, data_plane, kick):
    rows = make_messages(100, missing_user=(57,))
    start_worker(worker_cdp(data_plane))
    kick()
    assert data_plane.wait_for(99, ARRIVAL_TIMEOUT)
    assert wait_statuses({"sent": 99, "failed": 1}) == {"sent": 99, "failed": 1}
    poisoned = Message.objects.get(status="failed")
    assert poisoned.message_id == rows[57].message_id
    assert poisoned.last_response_code == 400
    assert "request neither has anonymousId nor userId" in poisoned.last_error
    assert sorted(data_plane.message_ids()) == sorted(
        r.message_id for i, r in enumerate(rows) if i != 57
    )


def test_wrong_write_key_then_fixed(start_worker, data_plane, kick):
    make_messages(20)
    bad = start_worker(worker_cdp(data_plane, WRITE_KEY="wrong-key"), sweep=0.3)
    kick()
    assert wait_until(
        lambda: Message.objects.filter(last_response_code=401).count() == 20, ARRIVAL_TIMEOUT
    )
    # A few more rounds of 401 (each answered and recorded before the next): the attempts
    # must still not count.
    answered = len(data_plane.requests)
    assert wait_until(lambda: _refusals_recorded(bad) >= answered + 3, ARRIVAL_TIMEOUT)
    assert data_plane.messages == [] and statuses() == {"pending": 20}
    assert set(Message.objects.values_list("attempts", flat=True)) == {0}
    assert Message.objects.first().last_error == "HTTP 401: invalid write key"
    assert "refused the write key" in bad.output() and "wrong-key" not in bad.output()
    bad.stop()
    start_worker(worker_cdp(data_plane), sweep=0.3)  # the key is fixed and deployed
    assert data_plane.wait_for(20, ARRIVAL_TIMEOUT)
    assert wait_statuses({"sent": 20}) == {"sent": 20}
    assert len(set(data_plane.message_ids())) == 20


def test_worker_killed_mid_batch(start_worker, data_plane, kick):
    rows = make_messages(200)
    data_plane.delay = 3.0  # stores the batch, answers late: the kill lands in between
    cdp = worker_cdp(data_plane, MAX_BATCH_MESSAGES=50, LEASE_SECONDS=2, READ_TIMEOUT=10.0)
    first = start_worker(cdp, sweep=0.3)
    kick()
    assert wait_until(lambda: len(data_plane.requests) >= 1, ARRIVAL_TIMEOUT)
    first.kill(signal.SIGKILL)
    in_flight = set(data_plane.message_ids())
    assert in_flight and statuses() == {"pending": 200}
    data_plane.delay = 0.0
    start_worker(cdp, sweep=0.3)
    expected = {r.message_id for r in rows}
    assert wait_until(lambda: set(data_plane.message_ids()) == expected, ARRIVAL_TIMEOUT)
    assert wait_statuses({"sent": 200}) == {"sent": 200}
    counts = collections.Counter(data_plane.message_ids())
    duplicated = {mid for mid, n in counts.items() if n > 1}
    assert duplicated <= in_flight  # only the batch in flight was sent twice...
    by_id = collections.defaultdict(list)
    for message in data_plane.messages:
        by_id[message["messageId"]].append({k: v for k, v in message.items() if k != "sentAt"})
    for mid in duplicated:  # ...and with the same messageId and content
        assert all(m == by_id[mid][0] for m in by_id[mid])


@pytest.mark.postgres
def test_two_workers_drain_10000_concurrently(start_worker, data_plane, kick, queue_name):
    rows = make_messages(10_000)
    cdp = worker_cdp(data_plane, MAX_BATCH_MESSAGES=250)
    workers = [start_worker(cdp, name=f"w{i}") for i in (1, 2)]
    from django_cdp.tasks import deliver

    for _ in range(4):
        deliver.apply_async(kwargs={"using": "default"}, queue=queue_name)
    assert data_plane.wait_for(10_000, 90.0)
    assert wait_statuses({"sent": 10_000}, 30.0) == {"sent": 10_000}
    # Every published run has returned (its requests all answered): nothing is in flight.
    assert wait_until(lambda: sum(w.output().count(" succeeded in ") for w in workers) == 4, 30.0)
    counts = collections.Counter(data_plane.message_ids())
    assert len(counts) == 10_000 and max(counts.values()) == 1
    assert set(counts) == {r.message_id for r in rows}
    assert sum(sent_counts(w) for w in workers) == 10_000
    assert all(sent_counts(w) > 0 for w in workers), "both workers should have sent"


def test_hanging_data_plane_does_not_hang_the_worker(start_worker, data_plane, kick):
    make_messages(10)
    data_plane.hang.set()
    worker = start_worker(worker_cdp(data_plane, READ_TIMEOUT=1.0), sweep=0.5)
    kick()
    assert wait_until(
        lambda: Message.objects.filter(last_error__startswith="timeout").count() == 10, 15.0
    )
    assert wait_until(lambda: "succeeded" in worker.output(), 5.0)  # the task returned
    data_plane.hang.clear()
    assert data_plane.wait_for(10, ARRIVAL_TIMEOUT)
    assert wait_statuses({"sent": 10}) == {"sent": 10}


# --- erasure racing a worker -----------------------------------------------------------------


class HoldingDataPlane(DataPlaneServer):
    """Reads each request, never answers, and notes when the client gives up (closes)."""

    def __init__(self) -> None:
        super().__init__(write_key=WRITE_KEY)
        self.arrived = threading.Event()
        self.gone = threading.Event()
        self.gone_at = 0.0

    def handle_post(self, handler) -> None:
        handler.rfile.read(int(handler.headers["Content-Length"]))
        handler.close_connection = True
        self.arrived.set()
        while handler.connection.recv(65536):  # until the client closes the connection
            pass
        self.gone_at = time.monotonic()
        self.gone.set()


@pytest.fixture
def holding_data_plane() -> Iterator[HoldingDataPlane]:
    server = HoldingDataPlane().start()
    yield server
    server.stop()


def test_erasure_returns_only_when_no_request_carrying_the_user_runs(
    start_worker, holding_data_plane, kick
):
    # The request would be allowed 1 + 10 s, the lease is 3 s: the worker cuts its request
    # where the lease ends, and erasure waits for the lease to end.
    make_messages(3, users=1)
    start_worker(
        worker_cdp(holding_data_plane, LEASE_SECONDS=3, CONNECT_TIMEOUT=1.0, READ_TIMEOUT=10.0)
    )
    kick()
    assert holding_data_plane.arrived.wait(ARRIVAL_TIMEOUT)  # claimed and being sent
    result = retention.erase_user("1")
    returned = time.monotonic()
    assert (result.messages, result.in_flight) == (3, 3)
    assert 0 < result.in_flight_seconds <= 3
    assert holding_data_plane.gone.is_set(), "erasure returned while the request still ran"
    assert holding_data_plane.gone_at <= returned
    assert not Message.objects.exists()


def test_worker_leaves_messages_erased_mid_batch_out_of_its_next_requests(
    start_worker, data_plane, kick
):
    rows = make_messages(4, users=2)  # users 1, 2, 1, 2
    data_plane.reject_message_ids = {rows[1].message_id}  # a 400: the batch is bisected
    data_plane.delay = 1.0
    start_worker(worker_cdp(data_plane, LEASE_SECONDS=20))
    kick()
    assert wait_until(lambda: data_plane.requests, ARRIVAL_TIMEOUT)  # first request in flight
    result = retention.erase_user("1", wait=False)
    data_plane.delay = 0.0
    assert (result.messages, result.in_flight) == (2, 2)
    assert wait_statuses({"failed": 1, "sent": 1}) == {"failed": 1, "sent": 1}
    erased = {rows[0].message_id, rows[2].message_id}
    assert erased <= set(data_plane.requests[0].message_ids)
    assert all(not erased & set(r.message_ids) for r in data_plane.requests[1:])
    assert data_plane.message_ids() == [rows[3].message_id]
