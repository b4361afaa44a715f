"""The delivery log: changelist, filters, search, detail, requeue, permissions, query count."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.contrib.admin.sites import site
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_cdp import admin as cdp_admin
from django_cdp.admin_filters import filter_parameters
from django_cdp.models import Message
from tests.admin.conftest import create_message, make_message

CHANGELIST = reverse("admin:django_cdp_message_changelist")


def change_url(message: Message) -> str:
    return reverse("admin:django_cdp_message_change", args=[message.pk])


def shown(response) -> list[str]:
    """The messageIds on the page, in order (via the result list's object ids)."""
    return [m.message_id for m in response.context["cl"].result_list]


# --- changelist --------------------------------------------------------------------------------


def test_changelist_columns_and_newest_first(admin_client_):
    old = create_message(created_at=timezone.now() - timedelta(hours=2))
    new = create_message(event="Shop Updated", user_id="7")
    response = admin_client_.get(CHANGELIST)
    assert response.status_code == 200
    assert shown(response) == [new.message_id, old.message_id]
    html = response.content.decode()
    for column in ("Created at", "Type", "Event", "UserId", "Status", "Attempts", "Sent at"):
        assert column in html
    assert "Last response code" in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status__exact=failed", ["failed"]),
        ("type__exact=identify", ["identify"]),
        ("event=Shop+Updated", ["shop"]),
        ("source_model=shops.shop", ["shop"]),
        ("created=1h", ["failed", "identify", "shop"]),
        ("created=7d", ["failed", "identify", "shop", "old"]),
    ],
)
def test_filters(admin_client_, query, expected):
    create_message(message_id="old", created_at=timezone.now() - timedelta(days=3))
    create_message(message_id="shop", event="Shop Updated", source_model="shops.shop")
    create_message(message_id="identify", type=Message.Type.IDENTIFY)
    create_message(message_id="failed", status=Message.Status.FAILED)
    response = admin_client_.get(f"{CHANGELIST}?{query}")
    assert response.status_code == 200
    assert shown(response) == expected


def test_only_the_filters_parameters_are_allowed(admin_client_, rf, superuser):
    request = rf.get(CHANGELIST)
    request.user = superuser
    assert filter_parameters(site._registry[Message], request) == {
        "status__exact",
        "status__isnull",
        "type__exact",
        "type__isnull",
        "event",
        "source_model",
        "source_pk",
        "created",
        "flagged",
    }


@pytest.mark.parametrize(
    "query",
    [
        "payload__icontains=secret",
        "last_error__regex=.*",
        "user_id__icontains=4",
        "event__startswith=Pay",
        "source_pk__gt=1",
        "created_at__lt=2030-01-01",
        "status__exact=failed&violations__contains=x",
    ],
)
def test_other_lookups_are_refused_with_a_400(admin_client_, query):
    create_message(status=Message.Status.FAILED, last_error="secret")
    response = admin_client_.get(f"{CHANGELIST}?{query}")
    assert response.status_code == 400  # Django's answer to DisallowedModelAdminLookup
    assert "cl" not in (response.context or {})  # no list was built, no query ran for it


def test_event_and_source_choices_come_from_the_registry(admin_client_):
    create_message(event="Something Nobody Configured")
    with CaptureQueriesContext(connection) as queries:
        response = admin_client_.get(CHANGELIST)
    html = response.content.decode()
    assert "?event=Payout+Created" in html
    assert "?event=Account+Mapping+Deleted" in html
    assert "?source_model=accounting.shopsettings" in html
    (events,) = [
        spec
        for spec in response.context["cl"].filter_specs
        if getattr(spec, "parameter_name", None) == "event"
    ]
    choices = [value for value, _ in events.lookup_choices]
    assert "Payout Created" in choices
    assert "Something Nobody Configured" not in choices
    assert not [q for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]


@pytest.mark.parametrize("term", ["u-1", "the-message-id", "Shop Updated"])
def test_search_is_exact_on_user_id_message_id_event(admin_client_, term):
    create_message(user_id="u-1", message_id="the-message-id", event="Shop Updated")
    create_message(user_id="u-10", event="Shop Updated Later")
    response = admin_client_.get(CHANGELIST, {"q": term})
    assert shown(response) == ["the-message-id"]


def test_banner_fine_and_stuck(admin_client_):
    response = admin_client_.get(CHANGELIST)
    assert "Everything is fine" in response.content.decode()
    create_message(created_at=timezone.now() - timedelta(hours=1))
    response = admin_client_.get(CHANGELIST)
    html = response.content.decode()
    assert "Delivery is stuck" in html
    assert "oldest pending message was written 60 min ago" in html


def test_banner_reports_a_refused_write_key_without_showing_it(admin_client_, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "WRITE_KEY": "sekrit-write-key"}
    create_message(last_response_code=401, last_error="401 for key sekrit-write-key: Unauthorized")
    html = admin_client_.get(CHANGELIST).content.decode()
    assert "the data plane answers 401" in html
    assert "sekrit-write-key" not in html
    assert "for key ****" in html


# --- detail ----------------------------------------------------------------------------------


def test_detail_reads_like_the_call_and_shows_the_json(admin_client_):
    m = create_message(
        user_id="shop-9",
        status=Message.Status.FAILED,
        attempts=10,
        last_response_code=400,
        last_error="400 Bad Request: invalid <properties>",
        properties={"amount": "99.00", "currency": "USD"},
    )
    response = admin_client_.get(change_url(m))
    assert response.status_code == 200
    html = response.content.decode()
    assert "<b>shop-9</b> did <b>Payout Created</b> with properties" in html
    assert "<code>amount</code>: &quot;99.00&quot;" in html
    assert "{\n  &quot;type&quot;: &quot;track&quot;," in html  # pretty-printed
    assert "invalid &lt;properties&gt;" in html  # escaped
    assert 'name="_save"' not in html  # read-only: no save button
    assert f'href="/admin/payouts/payout/{m.source_pk}/change/"' in html


def test_detail_of_an_identify_lists_traits(admin_client_):
    m = create_message(type=Message.Type.IDENTIFY, traits={"plan": "Growth"})
    html = admin_client_.get(change_url(m)).content.decode()
    assert "Identify <b>42</b> with traits" in html
    assert "<code>plan</code>: &quot;Growth&quot;" in html


def test_source_without_admin_is_plain_text(admin_client_):
    m = create_message(source_model="django_cdp.traitsdigest", source_pk="x")
    html = admin_client_.get(change_url(m)).content.decode()
    assert "django_cdp.traitsdigest #x" in html


# --- read-only and permissions -----------------------------------------------------------------


def test_add_view_and_change_post_are_forbidden(admin_client_):
    m = create_message()
    assert admin_client_.get(reverse("admin:django_cdp_message_add")).status_code == 403
    response = admin_client_.post(change_url(m), {"status": "sent"})
    assert response.status_code == 403
    m.refresh_from_db()
    assert m.status == Message.Status.PENDING


def test_delete_only_for_superusers(admin_client_, operator_client):
    m = create_message()
    delete_url = reverse("admin:django_cdp_message_delete", args=[m.pk])
    assert operator_client.get(delete_url).status_code == 403
    assert operator_client.post(delete_url, {"post": "yes"}).status_code == 403
    assert Message.objects.filter(pk=m.pk).exists()
    assert admin_client_.post(delete_url, {"post": "yes"}).status_code == 302
    assert not Message.objects.filter(pk=m.pk).exists()


def test_anonymous_goes_to_login(client, db):
    m = create_message()
    for url in (CHANGELIST, change_url(m)):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")


def test_staff_without_view_permission_get_403(nobody_client):
    m = create_message()
    assert nobody_client.get(CHANGELIST).status_code == 403
    assert nobody_client.get(change_url(m)).status_code == 403


def test_view_permission_is_enough_to_read(viewer_client):
    m = create_message()
    assert viewer_client.get(CHANGELIST).status_code == 200
    assert viewer_client.get(change_url(m)).status_code == 200


# --- requeue ---------------------------------------------------------------------------------


def _requeue(client, *messages: Message):
    return client.post(
        CHANGELIST,
        {"action": "requeue", "_selected_action": [m.pk for m in messages]},
        follow=True,
    )


def test_requeue_resets_failed_messages_and_kicks_delivery(
    operator_client, monkeypatch, django_capture_on_commit_callbacks
):
    kicked = []
    monkeypatch.setattr("django_cdp.kick.request_delivery", kicked.append)
    failed = create_message(
        status=Message.Status.FAILED,
        attempts=10,
        last_error="gave up",
        last_response_code=500,
        next_attempt_at=timezone.now() - timedelta(days=1),
        locked_by="w1",
    )
    sent = create_message(status=Message.Status.SENT, attempts=1)
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        response = _requeue(operator_client, failed, sent)
    assert "Requeued 1 failed message(s)." in response.content.decode()
    failed.refresh_from_db()
    sent.refresh_from_db()
    assert failed.status == Message.Status.PENDING
    assert failed.attempts == 0
    assert failed.next_attempt_at >= before
    assert failed.locked_by == "" and failed.locked_until is None
    assert failed.last_error == "gave up"  # kept as history until the next attempt
    assert sent.status == Message.Status.SENT and sent.attempts == 1
    assert kicked == ["default"]


def test_requeue_nothing_failed_warns(operator_client):
    m = create_message(status=Message.Status.SENT)
    response = _requeue(operator_client, m)
    assert "only failed messages can be requeued" in response.content.decode()


def test_requeue_needs_the_change_permission(viewer_client):
    m = create_message(status=Message.Status.FAILED)
    response = viewer_client.get(CHANGELIST)
    assert 'value="requeue"' not in response.content.decode()
    _requeue(viewer_client, m)
    m.refresh_from_db()
    assert m.status == Message.Status.FAILED


# --- cost --------------------------------------------------------------------------------------


def test_count_is_capped(admin_client_, monkeypatch):
    monkeypatch.setattr(cdp_admin, "COUNT_CAP", 5)
    Message.objects.bulk_create([make_message() for _ in range(8)])
    response = admin_client_.get(CHANGELIST)
    assert response.context["cl"].result_count == 5


#: session, user, capped count, page, oldest pending, refused pending, deferred statements
#: waiting. A superuser has no permission queries; the filters' choices and the full count
#: cost nothing.
CHANGELIST_QUERIES = 7


def _changelist_queries(client, query: str = "") -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(CHANGELIST + query)
    assert response.status_code == 200
    return len(queries.captured_queries)


def test_changelist_query_count_is_pinned(admin_client_):
    Message.objects.bulk_create([make_message() for _ in range(150)])
    assert _changelist_queries(admin_client_) == CHANGELIST_QUERIES
    assert _changelist_queries(admin_client_, "?status__exact=failed&q=42") == CHANGELIST_QUERIES


def test_changelist_never_reads_payloads(admin_client_):
    Message.objects.bulk_create(
        [make_message(properties={"notes": "x" * 10_000}) for _ in range(20)]
    )
    with CaptureQueriesContext(connection) as queries:
        response = admin_client_.get(CHANGELIST)
    assert len(response.context["cl"].result_list) == 20
    message_sql = [q["sql"] for q in queries.captured_queries if "django_cdp_message" in q["sql"]]
    assert message_sql
    # Neither the page query nor a column of the list (a per-row load of the deferred
    # field would show up here) reads the payload.
    assert not [sql for sql in message_sql if '"payload"' in sql]


def test_changelist_with_100k_messages(admin_client_):
    statuses = [Message.Status.SENT] * 8 + [Message.Status.FAILED, Message.Status.PENDING]
    now = timezone.now()
    rows = []
    for i in range(100_000):
        m = make_message(
            message_id=f"m{i}",
            user_id=str(i % 500),
            status=statuses[i % 10],
            created_at=now - timedelta(seconds=100_000 - i),
        )
        rows.append(m)
        if len(rows) == 5000:
            Message.objects.bulk_create(rows)
            rows = []
    start = time.monotonic()
    assert _changelist_queries(admin_client_) == CHANGELIST_QUERIES
    assert _changelist_queries(admin_client_, "?status__exact=failed") == CHANGELIST_QUERIES
    assert _changelist_queries(admin_client_, "?q=7&created=24h") == CHANGELIST_QUERIES
    assert time.monotonic() - start < 10


def test_message_admin_is_registered():
    assert isinstance(site._registry[Message], cdp_admin.MessageAdmin)


def test_event_choices_include_manual_events_of_the_plan(admin_client_, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "EVENTS": {"Customer Charged": {"properties": {"amount": {"type": "number"}}}},
    }
    response = admin_client_.get(CHANGELIST)
    (events,) = [
        spec
        for spec in response.context["cl"].filter_specs
        if getattr(spec, "parameter_name", None) == "event"
    ]
    assert "Customer Charged" in [value for value, _ in events.lookup_choices]
