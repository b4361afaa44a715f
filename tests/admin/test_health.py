"""The delivery health page, the figures behind it, and ``manage.py cdp_health``."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from django_cdp import health
from django_cdp.models import DeliveryCount, DeliveryEndpoint, Message, count_hour
from tests.admin.conftest import create_message

HEALTH = reverse("admin:django_cdp_message_health")
NONE = {"superseded": 0}


def _sent(created_ago: timedelta, delay: float, **kw) -> Message:
    """A sent message, counted as delivery counts it (the health page reads the counters)."""
    created = timezone.now() - created_ago
    DeliveryCount.objects.add({(count_hour(created), "sent"): 1})
    return create_message(
        status=Message.Status.SENT,
        created_at=created,
        sent_at=created + timedelta(seconds=delay),
        **kw,
    )


@pytest.fixture
def traffic(db):
    """A day of mixed traffic: sends with known delays, failures, old and fresh pending."""
    for i in range(10):
        _sent(timedelta(minutes=10), delay=i + 1)  # delays 1..10 s
    _sent(timedelta(hours=5), delay=100)
    _sent(timedelta(days=3), delay=1)
    create_message(status=Message.Status.FAILED, last_error="400 Bad Request: bad event")
    create_message(status=Message.Status.FAILED, last_error="400 Bad Request: bad event")
    create_message(
        status=Message.Status.FAILED,
        last_error="gave up after 10 attempts",
        created_at=timezone.now() - timedelta(days=2),
    )
    create_message(status=Message.Status.PENDING)


def test_window_counts(traffic):
    windows = health.window_counts()
    assert windows["hour"] == {"written": 13, "sent": 10, "pending": 1, "failed": 2, **NONE}
    assert windows["day"] == {"written": 14, "sent": 11, "pending": 1, "failed": 2, **NONE}
    assert windows["week"] == {"written": 16, "sent": 12, "pending": 1, "failed": 3, **NONE}


def test_counts_come_from_the_counters_not_from_the_sent_rows(traffic):
    # Delivery's counters are the record of sent and superseded messages: the week's
    # sent rows are never read (nor counted twice), purged rows stay counted.
    Message.objects.filter(status=Message.Status.SENT).delete()
    DeliveryCount.objects.add({(count_hour(timezone.now()), "superseded"): 3})
    windows = health.window_counts()
    assert windows["hour"] == {
        "written": 16,
        "sent": 10,
        "pending": 1,
        "failed": 2,
        "superseded": 3,
    }
    hours = health.hourly()
    assert hours[-1]["superseded"] == 3 and sum(h["sent"] for h in hours) == 11


def test_a_failing_data_plane_makes_delivery_stuck_at_once(settings, db):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "DATA_PLANE_URL": "http://127.0.0.1:9"}
    DeliveryEndpoint.objects.create(url="http://127.0.0.1:9", failures=0)
    assert health.report()["status"].ok  # a healthy row
    DeliveryEndpoint.objects.update(
        failures=4, failing_since=timezone.now(), last_error="HTTP 503: Service Unavailable"
    )
    status = health.report()["status"]
    assert not status.ok
    assert "the data plane has failed since" in status.message
    assert "4 failed request(s) in a row, last: HTTP 503: Service Unavailable" in status.message
    code, out = _run()
    assert code == 1 and "the data plane has failed since" in out


def test_delays_percentiles(traffic):
    d = health.delays()
    assert d["n"] == 11
    assert d["p50"] == pytest.approx(6, abs=0.01)
    assert d["p95"] == pytest.approx(100, abs=0.01)


def test_top_errors_grouped_with_sample(traffic):
    errors = health.top_errors()
    assert [(e["error"], e["count"]) for e in errors] == [
        ("400 Bad Request: bad event", 2),
        ("gave up after 10 attempts", 1),
    ]
    assert Message.objects.get(pk=errors[0]["sample_id"]).last_error.startswith("400")


def test_hourly_buckets_fill_24_hours(traffic):
    hours = health.hourly()
    assert len(hours) == 24
    assert sum(h["sent"] for h in hours) == 11
    assert sum(h["failed"] for h in hours) == 2
    assert hours[-1]["sent"] + hours[-2]["sent"] >= 10  # the last ten minutes
    svg = health.hourly_svg(hours)
    assert svg.startswith("<svg") and 'class="bar-sent"' in svg


def test_status_fine_then_stuck(db):
    assert health.delivery_status().ok
    create_message(created_at=timezone.now() - timedelta(minutes=20))
    status = health.delivery_status()
    assert not status.ok
    assert "20 min ago" in status.message
    assert health.delivery_status(stuck_after=timedelta(hours=1)).ok


def test_failure_rate_makes_the_report_unhealthy(traffic):
    figures = health.report()
    assert figures["failure_rate"] == pytest.approx(2 / 12)
    assert not figures["status"].ok
    assert health.report(max_failure_rate=0.5)["status"].ok


def test_health_page(admin_client_, traffic):
    response = admin_client_.get(HEALTH)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="cdp-hourly-chart"' in html
    assert '<tr class="window-hour"><th>hour</th><td>13</td><td>10</td><td>1</td><td>2</td>' in html
    assert "400 Bad Request: bad event" in html
    assert "Delivery is stuck" in html  # 2 of 12 failed in the last hour
    assert "Write key</th><td>not set" in html


def test_health_page_shows_statements_waiting_to_become_messages(admin_client_, db):
    from django_cdp.models import DeferredStatement

    assert b"cdp-deferred" not in admin_client_.get(HEALTH).content
    DeferredStatement.objects.create(
        xid=1,
        source_model="payouts.payout",
        operation="update",
        expander="django_cdp_payouts_payout_expand_update",
        rows=[],
        row_count=2500,
        stamp="2026-12-02T00:00:00Z",
        message_id_prefix="019ad2a4-0000-7",
    )
    html = admin_client_.get(HEALTH).content.decode()
    assert "1 statement (2500 rows), stored whole by the capture triggers, waits" in html


def test_health_page_masks_the_write_key(admin_client_, settings, db):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "WRITE_KEY": "sekrit-write-key"}
    create_message(
        status=Message.Status.FAILED, last_error="rejected sekrit-write-key", last_response_code=400
    )
    html = admin_client_.get(HEALTH).content.decode()
    assert "sekrit-write-key" not in html
    assert "rejected ****" in html
    assert "set (hidden)" in html


def test_health_page_permissions(client, nobody_client, viewer_client):
    assert client.get(HEALTH)["Location"].startswith("/admin/login/")
    assert nobody_client.get(HEALTH).status_code == 403
    assert viewer_client.get(HEALTH).status_code == 200


def test_changelist_links_to_health(admin_client_):
    html = admin_client_.get(reverse("admin:django_cdp_message_changelist")).content.decode()
    assert f'href="{HEALTH}"' in html


# --- cdp_health ----------------------------------------------------------------------------


def _run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("cdp_health", *args, stdout=out)
    except SystemExit as exc:
        return int(exc.code), out.getvalue()
    return 0, out.getvalue()


def test_command_ok(db):
    _sent(timedelta(minutes=1), delay=2)
    code, out = _run()
    assert code == 0
    assert out.startswith("OK: Everything is fine")
    assert "write to sent: p50 2.00 s" in out


def test_command_stuck_exits_1(db):
    create_message(created_at=timezone.now() - timedelta(minutes=30))
    code, out = _run()
    assert code == 1
    assert out.startswith("STUCK:")
    assert _run("--max-pending-age", "3600")[0] == 0


def test_command_failure_rate_exits_1(traffic):
    assert _run()[0] == 1
    assert _run("--max-failure-rate", "0.5")[0] == 0


def test_command_config_error_exits_1(db, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "WRITE_KEY": "sekrit-write-key"}
    create_message(last_response_code=401, last_error="401 sekrit-write-key")
    code, out = _run("--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert "the data plane answers 401" in data["reasons"][0]
    assert "sekrit-write-key" not in out


def test_superseded_is_a_status_of_the_delivery_log_filter(admin_client_, db):
    create_message(status=Message.Status.SUPERSEDED, event="", type="identify")
    create_message(status=Message.Status.SENT)
    changelist = reverse("admin:django_cdp_message_changelist")
    html = admin_client_.get(changelist).content.decode()
    assert "?status__exact=superseded" in html
    response = admin_client_.get(changelist, {"status__exact": "superseded"})
    assert response.status_code == 200
    assert [m.status for m in response.context["cl"].result_list] == ["superseded"]
