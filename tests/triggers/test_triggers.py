"""The trigger engine: what signals miss is captured, and nothing in a trigger hurts a write."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

import django_cdp
from django_cdp.capture import engines, triggers
from django_cdp.models import Message, TraitsDigest
from example_project.payouts.models import Payout
from example_project.shops.models import Shop
from tests.triggers.conftest import clear, events, messages

pytestmark = pytest.mark.postgres


def payouts(shop, n: int = 3) -> list[Payout]:
    return [Payout(shop=shop, amount=Decimal(i + 1), currency="EUR") for i in range(n)]


# --- what signals miss ---------------------------------------------------------------------------


def test_bulk_create_writes_one_created_per_row(shop):
    Payout.objects.bulk_create(payouts(shop))
    assert events() == ["Payout Created"] * 3
    assert sorted(m["properties"]["amount"] for m in messages(type="track")) == [
        Decimal("1.00"),
        Decimal("2.00"),
        Decimal("3.00"),
    ]


def test_queryset_update_writes_one_updated_per_changed_row(shop):
    Payout.objects.bulk_create(payouts(shop))
    clear()
    Payout.objects.filter(amount__gte=2).update(currency="USD")
    tracks = messages(type="track")
    assert [m["event"] for m in tracks] == ["Payout Updated"] * 2
    assert {m["properties"]["changed_fields"] == ["currency"] for m in tracks} == {True}


def test_bulk_update_writes_only_real_changes(shop):
    created = Payout.objects.bulk_create(payouts(shop))
    clear()
    created[0].currency = "USD"
    Payout.objects.bulk_update(created, ["currency"])
    assert events() == ["Payout Updated"]


def test_queryset_delete_and_raw_sql_are_captured(shop):
    Payout.objects.bulk_create(payouts(shop))
    with connection.cursor() as cursor:
        cursor.execute("UPDATE payouts_payout SET status = 'paid' WHERE amount = 1")
    Payout.objects.filter(amount=3).delete()  # Django's fast delete: no signals at all
    assert events() == ["Payout Created"] * 3 + ["Payout Updated", "Payout Deleted"]


def test_an_update_that_changes_nothing_tracked_writes_nothing(shop):
    Payout.objects.bulk_create(payouts(shop))
    clear()
    Payout.objects.update(created_at=shop.created_at)
    assert messages() == []


# --- one event per object per transaction --------------------------------------------------------


def test_create_then_updates_is_one_created_with_final_values(shop):
    with transaction.atomic():
        payout = Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
        payout.amount = Decimal("2")
        payout.save()
        Payout.objects.filter(pk=payout.pk).update(currency="USD")
    (track,) = messages(type="track")
    assert track["event"] == "Payout Created"
    assert (track["properties"]["amount"], track["properties"]["currency"]) == (
        Decimal("2.00"),
        "USD",
    )


def test_changes_that_cancel_out_leave_nothing(shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    clear()
    with transaction.atomic():
        Payout.objects.filter(pk=payout.pk).update(amount=Decimal("5"))
        Payout.objects.filter(pk=payout.pk).update(amount=Decimal("1"))
    assert messages() == []


def test_updates_give_changed_fields_against_the_transactions_start(shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    clear()
    with transaction.atomic():
        Payout.objects.filter(pk=payout.pk).update(amount=Decimal("5"))
        Payout.objects.filter(pk=payout.pk).update(currency="USD")
    (track,) = messages(type="track")
    assert track["properties"]["changed_fields"] == ["amount", "currency"]


def test_update_then_delete_is_only_deleted_and_create_then_delete_nothing(shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    clear()
    with transaction.atomic():
        Payout.objects.filter(pk=payout.pk).update(amount=Decimal("5"))
        payout.delete()
        other = Payout.objects.create(shop=shop, amount=Decimal("9"), currency="EUR")
        other.delete()
    assert events() == ["Payout Deleted"]


def test_a_rolled_back_savepoint_takes_its_messages_with_it(shop):
    with transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
        with pytest.raises(RuntimeError), transaction.atomic():
            Payout.objects.create(shop=shop, amount=Decimal("2"), currency="EUR")
            raise RuntimeError
    assert [m["properties"]["amount"] for m in messages(type="track")] == [Decimal("1.00")]


# --- owners and identifies -----------------------------------------------------------------------


def test_the_owner_is_identified_once_per_transaction_with_final_traits(shop):
    with transaction.atomic():
        Shop.objects.filter(pk=shop.pk).update(email="a@acme.example")
        Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
        Shop.objects.filter(pk=shop.pk).update(email="b@acme.example")
        Payout.objects.create(shop=shop, amount=Decimal("2"), currency="EUR")
    (identify,) = messages(type="identify")
    assert identify["traits"]["email"] == "b@acme.example"
    digest = TraitsDigest.objects.get(user_id=str(shop.pk))
    assert digest.message_id == identify["messageId"]


def test_unchanged_traits_send_no_identify(shop):
    Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    assert messages(type="identify") == []


def test_a_statement_of_many_rows_of_one_owner_identifies_it_once_when_traits_changed(shop):
    """The digest check takes a statement's owners as they come (the same shop on every row):
    one changed owner, however often it is named, gives one identify."""
    with django_cdp.tracking_disabled():
        Shop.objects.filter(pk=shop.pk).update(email="quiet@acme.example")
    Payout.objects.bulk_create(payouts(shop, 5))
    assert events() == ["Payout Created"] * 5
    (identify,) = messages(type="identify")
    assert identify["traits"]["email"] == "quiet@acme.example"
    clear()
    Payout.objects.filter(shop=shop).update(currency="USD")
    assert events() == ["Payout Updated"] * 5
    assert messages(type="identify") == []


def test_a_deleted_owner_gets_its_deleted_and_no_identify(shop):
    Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    clear()
    pk = shop.pk
    shop.delete()  # cascades to its payouts first
    assert sorted(events()) == ["Payout Deleted", "Shop Deleted"]
    assert messages(type="identify") == []
    assert {m["userId"] for m in messages()} == {str(pk)}


def test_an_owner_that_resolves_to_nothing_gives_a_failed_row(shop):
    from tests.testapp.models import Customer, Order

    settings_models = {"testapp.Order": {"owner": "customer__shop", "properties": ["total"]}}
    with django_cdp_settings(MODELS=settings_models):
        customer = Customer.objects.create(shop=None, name="Ann")
        Order.objects.create(customer=customer, total=1, placed_at=shop.created_at)
    (row,) = Message.objects.filter(type="track")
    assert (row.status, row.last_error) == ("failed", "no userId")


def test_a_non_finite_float_fails_its_row_with_the_signal_engines_reason(shop):
    from tests.testapp.models import Reading

    with django_cdp_settings(
        MODELS={"testapp.Reading": {"owner": "shop", "properties": ["score"]}}
    ):
        reading = Reading.objects.create(shop=shop, score=float("inf"))
    (row,) = Message.objects.filter(type="track")
    assert row.status == "failed"
    assert row.last_error == f"testapp.Reading pk={reading.pk}: score: inf is not a JSON number"
    assert row.data["properties"] == {}


def test_a_too_large_message_fails_with_its_size_and_an_excerpt(shop):
    with django_cdp_settings(MAX_MESSAGE_BYTES=200):
        payout = Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    (row,) = Message.objects.filter(type="track")
    assert row.status == "failed"
    assert row.last_error.startswith(f"payouts.Payout pk={payout.pk}: too large (")
    assert " > 200 bytes); it begins: {" in row.last_error


# --- switches -----------------------------------------------------------------------------------


def test_tracking_disabled_silences_the_triggers_in_and_out_of_transactions(shop):
    with django_cdp.tracking_disabled():
        Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
        with transaction.atomic():
            Payout.objects.create(shop=shop, amount=Decimal("2"), currency="EUR")
    assert messages() == []
    with transaction.atomic():
        with django_cdp.tracking_disabled():
            Payout.objects.create(shop=shop, amount=Decimal("3"), currency="EUR")
        Payout.objects.create(shop=shop, amount=Decimal("4"), currency="EUR")  # on again
    assert [m["properties"]["amount"] for m in messages(type="track")] == [Decimal("4.00")]


def test_enabled_false_silences_the_triggers(shop):
    with django_cdp_settings(ENABLED=False):
        Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    assert messages() == []


def test_a_literal_percent_in_a_write_survives_the_injected_setting(shop):
    with django_cdp.tracking_disabled(), connection.cursor() as cursor:
        cursor.execute("UPDATE shops_shop SET domain = 'a%b.example'")
    assert Shop.objects.get().domain == "a%b.example"


# --- installation ---------------------------------------------------------------------------------


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("cdp_triggers", *args, stdout=out)
    return out.getvalue()


def test_check_is_green_when_installed_and_red_after_uninstall(triggers_installed):
    assert "payouts.Payout" in run("--check")
    run("uninstall")
    with pytest.raises(CommandError, match="missing") as exc:
        run("--check")
    assert exc.value.returncode == 1
    run("install")
    run("--check")


def test_status_names_each_models_engine_and_why(triggers_installed):
    out = run()
    assert "payouts.Payout" in out and "triggers" in out and "current" in out


def test_a_settings_change_without_install_is_outdated(triggers_installed, settings):
    from django.core.signals import setting_changed

    from django_cdp.capture.triggers import _reinstall_on_change

    setting_changed.disconnect(_reinstall_on_change)
    try:
        settings.DJANGO_CDP = {**settings.DJANGO_CDP, "MAX_MESSAGE_BYTES": 1000}
        with pytest.raises(CommandError, match="outdated"):
            run("--check")
        from django_cdp.checks import check_triggers

        found = check_triggers(databases=["default"])
        assert [m.id for m in found] == ["django_cdp.I002", "django_cdp.W003"]
        warning = found[1]
        assert "payouts.Payout" in warning.msg
    finally:
        setting_changed.connect(_reinstall_on_change)


def test_a_database_that_never_had_triggers_is_not_stale(triggers_installed):
    from django_cdp.checks import check_triggers

    run("uninstall")
    assert [m.id for m in check_triggers(databases=["default"])] == ["django_cdp.I002"]


def test_signals_models_keep_no_triggers(transactional_db, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "CAPTURE": "signals"}
    assert all(row.state == "-" for row in triggers.status("default"))
    assert engines.engine_for(Payout, "default") == engines.SIGNALS


@pytest.fixture
def triggers_installed(triggers):
    return None


class django_cdp_settings:
    """``override_settings`` of some ``DJANGO_CDP`` keys (the triggers follow)."""

    def __init__(self, **keys):
        from django.conf import settings
        from django.test import override_settings

        self.override = override_settings(DJANGO_CDP={**settings.DJANGO_CDP, **keys})

    def __enter__(self):
        self.override.__enter__()

    def __exit__(self, *exc):
        self.override.__exit__(*exc)
