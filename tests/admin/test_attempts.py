"""The "Delivery attempts" table on the message detail page."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_cdp import admin as cdp_admin
from django_cdp.models import DeliveryAttempt, Message
from tests.admin.conftest import create_message

#: Session, user, the message, its attempts.
DETAIL_QUERIES = 4


def change_url(message: Message) -> str:
    return reverse("admin:django_cdp_message_change", args=[message.pk])


def attempt_rows(html: str) -> list[str]:
    """The table rows of the attempts, in page order."""
    return re.findall(r'<tr class="cdp-attempt [^"]*">(.*?)</tr>', html, re.S)


def add_attempts(message: Message, n: int, **fields) -> None:
    DeliveryAttempt.objects.bulk_create(
        DeliveryAttempt(
            message=message,
            number=i + 1,
            outcome=fields.get("outcome", "retry"),
            response_code=fields.get("response_code", 503),
            response_excerpt=fields.get("response_excerpt", f"busy {i + 1}"),
            error=fields.get("error", ""),
            duration_ms=fields.get("duration_ms", 120),
            worker="host:1:abcd",
        )
        for i in range(n)
    )


def test_attempts_newest_first_with_code_duration_and_escaped_text(admin_client_):
    m = create_message(status=Message.Status.FAILED, attempts=3)
    add_attempts(m, 1, response_excerpt="<html>Service Unavailable</html>", duration_ms=412)
    add_attempts(m, 1, response_code=None, error="timeout: ReadTimeout: <read timed out>")
    DeliveryAttempt.objects.filter(message=m, error__startswith="timeout").update(number=2)
    add_attempts(m, 1, outcome="refused", response_code=400, response_excerpt="no userId")
    DeliveryAttempt.objects.filter(message=m, outcome="refused").update(number=3)

    html = admin_client_.get(change_url(m)).content.decode()

    assert "Delivery attempts" in html
    rows = attempt_rows(html)
    assert len(rows) == 3
    newest, timeout, oldest = rows
    assert "<td>3</td>" in newest and "refused" in newest and "<td>400</td>" in newest
    assert "no userId" in newest
    assert "<td>2</td>" in timeout and "<td>-</td>" in timeout  # no response code
    assert "timeout: ReadTimeout: &lt;read timed out&gt;" in timeout
    assert "<td>1</td>" in oldest and "<td>503</td>" in oldest and "412 ms" in oldest
    assert "&lt;html&gt;Service Unavailable&lt;/html&gt;" in oldest
    assert "<html>Service" not in html


def test_at_most_50_attempts_with_a_note(admin_client_):
    m = create_message(status=Message.Status.FAILED)
    add_attempts(m, cdp_admin.ATTEMPTS_LIMIT + 10)
    html = admin_client_.get(change_url(m)).content.decode()
    rows = attempt_rows(html)
    assert len(rows) == cdp_admin.ATTEMPTS_LIMIT
    assert "busy 60" in rows[0] and "busy 11" in rows[-1]
    assert "Only the newest 50 attempts are shown." in html


def test_no_attempts(admin_client_):
    m = create_message(status=Message.Status.SENT, last_response_code=200)
    html = admin_client_.get(change_url(m)).content.decode()
    assert attempt_rows(html) == []
    assert "No failed attempt is recorded for this message." in html
    assert "Only the newest" not in html


def test_the_write_key_is_masked_on_the_page(admin_client_, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "WRITE_KEY": "live-key-1234"}
    m = create_message(status=Message.Status.PENDING)
    add_attempts(
        m, 1, outcome="config_error", response_code=401, response_excerpt="bad live-key-1234"
    )
    html = admin_client_.get(change_url(m)).content.decode()
    assert "live-key-1234" not in html and "bad ****" in html


def test_view_permission_is_enough(viewer_client):
    m = create_message()
    add_attempts(m, 2)
    assert len(attempt_rows(viewer_client.get(change_url(m)).content.decode())) == 2


def _detail_queries(client, message: Message) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(change_url(message))
    assert response.status_code == 200
    return len(ctx.captured_queries)


def test_detail_query_count_is_pinned(admin_client_):
    none = create_message()
    many = create_message()
    add_attempts(many, 60)
    assert _detail_queries(admin_client_, none) == DETAIL_QUERIES
    assert _detail_queries(admin_client_, many) == DETAIL_QUERIES


def test_unknown_message_redirects_without_reading_attempts(admin_client_):
    response = admin_client_.get(reverse("admin:django_cdp_message_change", args=[999999]))
    assert response.status_code == 302


def test_superuser_delete_takes_the_attempts(admin_client_):
    m = create_message()
    add_attempts(m, 3)
    delete_url = reverse("admin:django_cdp_message_delete", args=[m.pk])
    assert admin_client_.post(delete_url, {"post": "yes"}).status_code == 302
    assert not DeliveryAttempt.objects.exists()


@pytest.mark.parametrize("object_id", ["abc", "1.5"])
def test_malformed_ids_do_not_break_the_page(admin_client_, object_id):
    url = reverse("admin:django_cdp_message_changelist") + f"{object_id}/change/"
    assert admin_client_.get(url).status_code in (302, 404)
