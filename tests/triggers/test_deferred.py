"""Deferred statements: a statement is stored whole and becomes its messages later."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core import checks
from django.db import connection, transaction

import django_cdp
from django_cdp import retention
from django_cdp.capture import deferred, triggers
from django_cdp.delivery import drain
from django_cdp.models import DeferredStatement, Message, TraitsDigest
from django_cdp.registry import registry
from example_project.payouts.models import Payout
from tests.triggers.conftest import events, messages

pytestmark = pytest.mark.postgres


@pytest.fixture
def defer(shop, settings) -> int:
    """Statements of 3 rows or more of a deferrable model are deferred."""
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "DEFER_STATEMENT_ROWS": 3}
    return 3


def payouts(shop, n: int) -> list[Payout]:
    return [Payout(shop=shop, amount=Decimal(i + 1), currency="EUR") for i in range(n)]


def stored() -> list[tuple[str, str, int]]:
    return [(s.source_model, s.operation, s.row_count) for s in DeferredStatement.objects.all()]


# --- what is deferred ---------------------------------------------------------------------------


def test_a_large_statement_is_stored_whole_and_expanded_into_its_messages(shop, defer):
    Payout.objects.bulk_create(payouts(shop, 4))
    assert Message.objects.filter(type="track").count() == 0
    assert stored() == [("payouts.payout", "insert", 4)]
    assert deferred.expand() == 1
    assert stored() == []
    tracks = messages(type="track")
    assert [m["event"] for m in tracks] == ["Payout Created"] * 4
    assert [m["properties"]["amount"] for m in tracks] == [Decimal(f"{i}.00") for i in (1, 2, 3, 4)]
    assert {m["userId"] for m in tracks} == {str(shop.pk)}
    assert len({m["messageId"] for m in tracks}) == 4


def test_a_statement_below_the_threshold_writes_its_messages_at_once(shop, defer):
    Payout.objects.bulk_create(payouts(shop, 2))
    assert events() == ["Payout Created"] * 2
    assert stored() == []


def test_large_updates_and_deletes_are_deferred_with_what_they_changed(shop, defer):
    with django_cdp.tracking_disabled():
        Payout.objects.bulk_create(payouts(shop, 3))
    Payout.objects.filter(shop=shop).update(currency="USD")
    Payout.objects.filter(shop=shop).delete()
    assert stored() == [("payouts.payout", "update", 3), ("payouts.payout", "delete", 3)]
    deferred.expand()
    tracks = messages(type="track")
    assert [m["event"] for m in tracks] == ["Payout Updated"] * 3 + ["Payout Deleted"] * 3
    assert {tuple(m["properties"]["changed_fields"]) for m in tracks[:3]} == {("currency",)}
    assert {m["userId"] for m in tracks} == {str(shop.pk)}


def test_the_owner_is_re_identified_when_the_statement_is_expanded(shop, defer):
    """The re-identify waits with the messages, and sends the traits the owner has then."""
    TraitsDigest.objects.all().delete()
    Payout.objects.bulk_create(payouts(shop, 3))
    assert messages(type="identify", expand=False) == []
    with django_cdp.tracking_disabled():
        type(shop).objects.filter(pk=shop.pk).update(email="later@acme.example")
    (identify,) = messages(type="identify")
    assert identify["userId"] == str(shop.pk)
    assert identify["context"]["traits"]["email"] == "later@acme.example"
    assert stored() == []


def test_an_owner_deleted_before_the_expansion_gets_no_identify(shop, defer):
    TraitsDigest.objects.all().delete()
    Payout.objects.bulk_create(payouts(shop, 3))
    with django_cdp.tracking_disabled():
        shop.delete()
    assert events() == ["Payout Created"] * 3
    assert messages(type="identify") == []


def test_expanded_messages_keep_the_statements_time_and_context(shop, defer):
    with django_cdp.context(ip="203.0.113.9"):
        Payout.objects.bulk_create(payouts(shop, 3))
    statement = DeferredStatement.objects.get()
    deferred.expand()
    rows = list(Message.objects.filter(type="track"))
    assert {r.created_at for r in rows} == {statement.created_at}
    assert {r.next_attempt_at for r in rows} == {statement.created_at}
    assert {m["originalTimestamp"] for m in messages(type="track")} == {statement.stamp}
    assert {m["context"]["ip"] for m in messages(type="track")} == {"203.0.113.9"}


def test_models_whose_messages_read_other_rows_are_never_deferred(shop, defer, settings):
    """A property or owner reached through another table is read when the statement runs."""
    from tests.testapp.models import Customer, Reading

    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {
            **settings.DJANGO_CDP["MODELS"],
            "testapp.Reading": {"owner": "shop", "properties": {"plan": "shop__plan__name"}},
            "testapp.Customer": {"owner": "shop", "properties": ["name"]},
        },
    }
    reading = registry.get(Reading)
    customer = registry.get(Customer)
    assert not triggers.deferrable(reading)
    assert triggers.deferrable(customer)
    assert not triggers.deferrable(registry.get(type(shop)))  # the identity model
    Reading.objects.bulk_create([Reading(shop=shop, score=1.0) for _ in range(3)])
    assert events() == ["Reading Created"] * 3
    assert stored() == []


def test_a_large_statement_is_stored_in_parts(shop, defer, settings, monkeypatch):
    """A jsonb value cannot exceed 256 MB: the rows go in parts of STORE_ROWS (and bytes)."""
    monkeypatch.setattr(triggers, "STORE_ROWS", 2)
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "DEFER_STATEMENT_ROWS": 3}  # re-installs
    Payout.objects.bulk_create(payouts(shop, 5))
    assert sorted(s[2] for s in stored()) == [1, 2, 2]
    assert deferred.expand() == 3
    assert sorted(m["properties"]["amount"] for m in messages(type="track")) == [
        Decimal(f"{i}.00") for i in (1, 2, 3, 4, 5)
    ]


def test_with_consent_nothing_is_deferred(shop, defer, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "CONSENT": "analytics_opt_in"}
    assert not triggers.deferrable(registry.get(Payout))
    Payout.objects.bulk_create(payouts(shop, 3))
    assert stored() == []
    assert events() == ["Payout Created"] * 3


def test_only_the_expanding_function_may_call_an_expander(shop, defer):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT bool_or(a.grantee = 0) FROM pg_proc p, aclexplode(p.proacl) a "
            "WHERE p.proname = %s",
            [triggers.expander_name(registry.get(Payout), "insert")],
        )
        assert cursor.fetchone()[0] is False  # no grant to PUBLIC


def test_none_never_defers(shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "DEFER_STATEMENT_ROWS": None}
    Payout.objects.bulk_create(payouts(shop, 1200))
    assert Message.objects.filter(type="track").count() == 1200
    assert stored() == []


def test_tracking_disabled_defers_nothing(shop, defer):
    with django_cdp.tracking_disabled():
        Payout.objects.bulk_create(payouts(shop, 3))
    assert stored() == []


# --- one transaction ------------------------------------------------------------------------------


def test_a_later_statement_expands_the_transactions_deferred_ones_first(shop, defer):
    """Create (deferred) then update one: one Created with the final values."""
    with transaction.atomic():
        created = Payout.objects.bulk_create(payouts(shop, 3))
        assert stored() == [("payouts.payout", "insert", 3)]
        Payout.objects.filter(pk=created[0].pk).update(amount=Decimal("9"))
        assert stored() == []
    tracks = messages(type="track")
    assert [m["event"] for m in tracks] == ["Payout Created"] * 3
    assert sorted(m["properties"]["amount"] for m in tracks) == [
        Decimal("2.00"),
        Decimal("3.00"),
        Decimal("9.00"),
    ]


def test_deferred_statements_of_one_transaction_combine_when_expanded(shop, defer):
    with django_cdp.tracking_disabled():
        Payout.objects.bulk_create(payouts(shop, 3))
    with transaction.atomic():
        Payout.objects.filter(shop=shop).update(currency="USD")
        Payout.objects.filter(shop=shop).update(status="paid")
        Payout.objects.filter(shop=shop).update(currency="EUR")
    assert [s[1] for s in stored()] == ["update"] * 3
    deferred.expand()
    tracks = messages(type="track")
    assert [m["event"] for m in tracks] == ["Payout Updated"] * 3
    assert {tuple(m["properties"]["changed_fields"]) for m in tracks} == {("status",)}


def test_create_then_delete_in_deferred_statements_leaves_nothing(shop, defer):
    with transaction.atomic():
        Payout.objects.bulk_create(payouts(shop, 3))
        Payout.objects.filter(shop=shop).delete()
    deferred.expand()
    assert events() == []


def test_a_rolled_back_savepoint_takes_its_deferred_statement_with_it(shop, defer):
    with transaction.atomic():
        Payout.objects.bulk_create(payouts(shop, 3))
        with pytest.raises(RuntimeError), transaction.atomic():
            Payout.objects.bulk_create(payouts(shop, 4))
            raise RuntimeError
        Payout.objects.create(shop=shop, amount=Decimal("7"), currency="EUR")
    assert stored() == []
    assert len(events()) == 4


def test_a_rolled_back_transaction_leaves_no_deferred_statement(shop, defer):
    with pytest.raises(RuntimeError), transaction.atomic():
        Payout.objects.bulk_create(payouts(shop, 3))
        raise RuntimeError
    assert stored() == []


# --- who expands ----------------------------------------------------------------------------------


def test_delivery_expands_before_it_claims(shop, defer, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND": False, "DELIVERY": "manual"}
    Payout.objects.bulk_create(payouts(shop, 3))
    result = drain()
    assert result.claimed == 3
    assert stored() == []
    assert set(Message.objects.filter(type="track").values_list("status", flat=True)) == {"skipped"}


def test_erasure_takes_the_users_deferred_events_too(shop, defer):
    Payout.objects.bulk_create(payouts(shop, 3))
    retention.erase_user(str(shop.pk))
    assert stored() == []
    assert Message.objects.filter(user_id=str(shop.pk)).count() == 0


def test_uninstall_expands_what_waits_before_the_functions_go(shop, defer):
    Payout.objects.bulk_create(payouts(shop, 3))
    triggers.uninstall("default")
    assert stored() == []
    assert events() == ["Payout Created"] * 3


def test_a_statement_whose_expander_is_gone_waits_and_holds_up_nothing(shop, defer):
    Payout.objects.bulk_create(payouts(shop, 3))
    DeferredStatement.objects.update(expander="django_cdp_no_such_function")
    Payout.objects.bulk_create(payouts(shop, 4))
    assert deferred.expand() == 1
    assert stored() == [("payouts.payout", "insert", 3)]
    assert events() == ["Payout Created"] * 4
    DeferredStatement.objects.all().delete()


def test_a_backlog_is_expanded_oldest_first_in_bounded_transactions(shop, defer, monkeypatch):
    monkeypatch.setattr(deferred, "ROWS_PER_TRANSACTION", 4)
    for n in (3, 4, 5):
        Payout.objects.bulk_create(payouts(shop, n))  # three transactions
    assert deferred.expand(max_rows=4) == 2  # 3 rows, then 4: past max_rows, it stops
    assert stored() == [("payouts.payout", "insert", 5)]
    assert len(events(expand=False)) == 7
    assert deferred.expand() == 1  # alone past ROWS_PER_TRANSACTION: a transaction is whole
    assert len(events()) == 12


def test_a_second_expander_waits_its_turn_instead_of_expanding_twice(shop, defer):
    """While one process expands (holding the lock), another returns at once."""
    from django.db import connections

    Payout.objects.bulk_create(payouts(shop, 3))
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [deferred.LOCK_KEY])
            assert deferred.expand() == 0
            assert stored() == [("payouts.payout", "insert", 3)]
            cursor.execute("ROLLBACK")
    finally:
        other.close()
    assert deferred.expand() == 1
    assert stored() == []


# --- settings and health ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -5])
def test_a_threshold_below_one_is_a_check_error_naming_the_key(settings, value):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "DEFER_STATEMENT_ROWS": value}
    errors = [e for e in checks.run_checks() if e.id == "django_cdp.E001"]
    assert any("DEFER_STATEMENT_ROWS" in e.msg for e in errors)


def test_raw_sql_is_deferred_like_the_orms_statements(shop, defer):
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO payouts_payout (shop_id, amount, currency, status, created_at) "
            "SELECT %s, g, 'EUR', 'pending', now() FROM generate_series(1, 5) g",
            [shop.pk],
        )
    assert stored() == [("payouts.payout", "insert", 5)]
    deferred.expand()
    assert events() == ["Payout Created"] * 5


def test_health_counts_deferred_statements_and_calls_old_ones_stuck(shop, defer):
    import datetime
    import io

    from django.core.management import call_command

    from django_cdp import health

    Payout.objects.bulk_create(payouts(shop, 3))
    Payout.objects.bulk_create(payouts(shop, 4))
    figures = health.report()
    assert {k: figures["deferred"][k] for k in ("statements", "rows")} == {
        "statements": 2,
        "rows": 7,
    }
    assert figures["status"].ok
    DeferredStatement.objects.update(
        created_at=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    )
    status = health.report()["status"]
    assert not status.ok
    assert "2 statement(s) of 7 rows deferred" in status.message
    out = io.StringIO()
    with pytest.raises(SystemExit):
        call_command("cdp_health", stdout=out)
    assert "deferred statements: 2 (7 rows) wait to become messages" in out.getvalue()


# --- every statement (the default) ------------------------------------------------------------


def test_by_default_a_single_row_write_is_stored_and_expanded_later(shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
    payout.amount = Decimal("6")
    payout.save()
    assert stored() == [("payouts.payout", "insert", 1), ("payouts.payout", "update", 1)]
    assert Message.objects.filter(type="track").count() == 0
    created, updated = messages(type="track")
    assert created["event"] == "Payout Created"
    assert created["properties"]["amount"] == Decimal("5.00")
    assert updated["properties"]["changed_fields"] == ["amount"]


def test_a_statement_of_no_rows_stores_nothing_and_expands_nothing(shop):
    with transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
        Payout.objects.filter(pk=-1).update(currency="USD")
        Payout.objects.filter(pk=-1).delete()
        assert stored() == [("payouts.payout", "insert", 1)]  # still waiting, alone
    assert events() == ["Payout Created"]


def test_expand_own_expands_this_transactions_statements_only(shop):
    Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")  # committed
    with transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("2"), currency="EUR")
        assert deferred.expand_own() == 1
        (track,) = messages(type="track", expand=False)
        assert track["properties"]["amount"] == Decimal("2.00")
    assert stored() == [("payouts.payout", "insert", 1)]
    assert deferred.expand_own() == 0  # outside a transaction: nothing of its own


def test_an_identify_written_at_the_expansion_is_the_statements(shop):
    """Its transaction, time, context and due time are those of the statement it follows."""
    TraitsDigest.objects.all().delete()
    with django_cdp.context(ip="203.0.113.9"):
        Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
    statement = DeferredStatement.objects.get()
    with transaction.atomic():  # as delivery expands: in a transaction of its own
        deferred.expand()
    row = Message.objects.get(type="identify")
    identify = row.data
    assert identify["originalTimestamp"] == statement.stamp
    assert identify["context"]["ip"] == "203.0.113.9"
    assert (row.xid, row.created_at, row.next_attempt_at) == (
        statement.xid,
        statement.created_at,
        statement.created_at,
    )


def test_the_expansion_identifies_an_owner_with_its_traits_then_and_only_when_changed(shop):
    """Delivery expands many transactions in one of its own: each compares the traits the owner
    has with the last identify recorded, so a change seen once is sent once."""
    TraitsDigest.objects.all().delete()
    Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    with django_cdp.tracking_disabled():
        type(shop).objects.filter(pk=shop.pk).update(email="second@acme.example")
    Payout.objects.create(shop=shop, amount=Decimal("2"), currency="EUR")
    deferred.expand()
    emails = [m["context"]["traits"]["email"] for m in messages(type="identify")]
    assert emails == ["second@acme.example"]  # the traits at the expansion, once: unchanged after
    with django_cdp.tracking_disabled():
        type(shop).objects.filter(pk=shop.pk).update(email="third@acme.example")
    Payout.objects.create(shop=shop, amount=Decimal("3"), currency="EUR")
    with django_cdp.tracking_disabled():
        type(shop).objects.filter(pk=shop.pk).update(email="fourth@acme.example")
    Payout.objects.create(shop=shop, amount=Decimal("4"), currency="EUR")
    with transaction.atomic():
        deferred.expand()
    emails = [m["context"]["traits"]["email"] for m in messages(type="identify")]
    assert emails == ["second@acme.example", "fourth@acme.example"]
