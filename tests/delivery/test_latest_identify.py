"""Latest identify wins: only a user's newest identify is sent, and never after a newer one.

In this process against the loopback data plane (``drain()``, ``claim()``); the
race with another claimer that holds an older identify locked needs row locks,
so that test runs on PostgreSQL only.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.db.models.functions import Now
from django.utils import timezone

from django_cdp import delivery, transport
from django_cdp.delivery import claim, drain
from django_cdp.models import DeliveryCount, DeliveryEndpoint, Message
from tests.delivery.conftest import make_messages, statuses

pytestmark = pytest.mark.django_db


def _identifies(user: str, n: int) -> list[Message]:
    rows = make_messages(n, kind="identify", users=1)
    Message.objects.filter(pk__in=[r.pk for r in rows]).update(user_id=user)
    return rows


def _claim(token: str, n: int = 100) -> list[delivery.Claimed]:
    return claim("default", token, max_messages=n, max_bytes=500_000, lease_seconds=60).rows


def test_only_the_newest_pending_identify_of_a_user_is_sent(configure, data_plane):
    old, older, newest = _identifies("7", 3)
    other = _identifies("8", 1)[0]
    tracks = make_messages(3, users=1)
    result = drain()
    assert (result.sent, result.superseded) == (5, 2)
    sent = set(data_plane.message_ids())
    assert sent == {newest.message_id, other.message_id} | {t.message_id for t in tracks}
    for row in (old, older):
        row.refresh_from_db()
        assert (row.status, row.attempts, row.locked_by) == ("superseded", 0, "")
        assert row.last_error == delivery.SUPERSEDED_ERROR
    assert statuses() == {"sent": 5, "superseded": 2}
    counted = dict(DeliveryCount.objects.values_list("status", "n"))
    assert counted == {"sent": 5, "superseded": 2}


def test_an_older_identify_claimed_alone_is_superseded_by_a_newer_one(configure, data_plane):
    old, new = _identifies("7", 2)
    # The newer one is not due (say, it waits for a backoff): the older one, due, is still
    # never sent, because the newer exists and will be.
    Message.objects.filter(pk=new.pk).update(next_attempt_at=timezone.now() + timedelta(hours=1))
    assert _claim("a") == []
    assert Message.objects.get(pk=old.pk).status == "superseded"
    Message.objects.filter(pk=new.pk).update(next_attempt_at=Now())  # the claim's clock
    assert drain().sent == 1 and data_plane.message_ids() == [new.message_id]


def test_a_sent_newer_identify_supersedes_an_older_one_written_late(configure, data_plane):
    old, new = _identifies("7", 2)
    Message.objects.filter(pk=new.pk).update(status="sent")  # the later id went out first
    assert _claim("a") == [] and Message.objects.get(pk=old.pk).status == "superseded"


def test_the_newest_waits_while_an_older_one_is_in_flight_and_retried(configure, data_plane):
    old = _identifies("7", 1)[0]
    [in_flight] = _claim("a")  # a worker is sending the old traits
    new = _identifies("7", 1)[0]
    assert _claim("b") == []  # the new traits must not overtake them
    waiting = Message.objects.get(pk=new.pk)
    assert waiting.status == "pending" and waiting.next_attempt_at > timezone.now()
    # The old one's request fails (503): back to pending. The next claim supersedes it.
    run = delivery._Run("default", None)
    run.mark_retry("a", [in_flight], transport.Response(503, "injected fault"), probe=False)
    Message.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    DeliveryEndpoint.objects.update(failures=0)  # others were delivered meanwhile
    assert drain().sent == 1
    assert data_plane.message_ids() == [new.message_id]
    assert Message.objects.get(pk=old.pk).status == "superseded"


def test_tracks_are_never_superseded(configure, data_plane):
    make_messages(5, users=1)
    assert drain().sent == 5 and statuses() == {"sent": 5}


@pytest.mark.postgres
def test_a_newest_identify_waits_while_another_claim_holds_an_older_one(
    transactional_db, configure, data_plane
):
    """Another worker's claim has locked the older identify but not committed its lease yet.

    Seen from here it is pending and unleased; only its row lock says it may be sent
    any moment. The newest must wait, not be sent alongside (SKIP LOCKED both ways).
    """
    if not connections["default"].features.has_select_for_update_skip_locked:
        pytest.skip("needs SKIP LOCKED")
    old = _identifies("7", 1)[0]
    new = _identifies("7", 1)[0]
    locked, release = threading.Event(), threading.Event()

    def other_claimer() -> None:
        try:
            with transaction.atomic():
                Message.objects.select_for_update().filter(pk=old.pk).get()
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=other_claimer)
    thread.start()
    try:
        assert locked.wait(10)
        assert _claim("b") == []
    finally:
        release.set()
        thread.join(10)
    assert Message.objects.get(pk=new.pk).next_attempt_at > timezone.now()
    assert Message.objects.get(pk=old.pk).status == "pending"  # the other claimer's call
    assert data_plane.requests == []
