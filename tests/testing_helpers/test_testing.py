"""``django_cdp.testing``: capture_messages(), the cdp_messages fixture and the assertions."""

from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import TestCase

from django_cdp.scope import tracking_disabled
from django_cdp.testing import CapturedMessages, capture_messages
from example_project.payouts.models import Payout
from example_project.shops.models import Plan, Shop


@pytest.fixture
def shop(transactional_db) -> Shop:
    plan = Plan.objects.create(name="Growth", monthly_price=Decimal("49.00"))
    return Shop.objects.create(domain="acme.example", email="a@acme.example", plan=plan)


def test_captures_tracks_and_identifies_written_in_the_block(shop):
    with capture_messages() as cdp:
        payout = Payout.objects.create(shop=shop, amount=Decimal("12.50"), currency="EUR")
        shop.email = "new@acme.example"
        shop.xero_connection_ok = False
        shop.save()

    assert cdp.events == ["Payout Created", "Shop Updated"]
    message = cdp.assert_tracked("Payout Created", properties={"amount": Decimal("12.5")})
    assert message["properties"]["id"] == payout.pk
    cdp.assert_tracked("Payout Created", properties={"currency": "EUR"}, user=shop, count=1)
    cdp.assert_identified(shop, traits={"email": "new@acme.example", "plan": "Growth"})
    cdp.assert_identified(str(shop.pk))
    assert len(cdp) == 3
    assert [m["type"] for m in cdp] == ["track", "track", "identify"]


def test_only_the_block_is_captured(shop):
    with capture_messages() as cdp:
        pass
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert cdp.messages == []
    cdp.assert_not_tracked("Payout Created")
    cdp.assert_not_identified(shop)


def test_a_payout_identifies_its_owner_shop_resolved_from_the_instance(shop):
    with capture_messages() as cdp:
        payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    # The shop's traits did not change: no identify, and the payout stands for its shop.
    cdp.assert_not_identified(payout)
    cdp.assert_tracked("Payout Created", user=payout)


def test_assert_tracked_failure_lists_what_was_tracked(shop):
    with capture_messages() as cdp:
        Payout.objects.create(shop=shop, amount=Decimal("12.50"), currency="EUR")

    with pytest.raises(AssertionError) as exc:
        cdp.assert_tracked("Payout Created", properties={"currency": "USD"})
    text = str(exc.value)
    assert 'expected track \'Payout Created\' with properties including {"currency": "USD"}' in (
        text
    )
    assert "found 0" in text
    assert "Captured 1 message(s):" in text
    assert "track 'Payout Created' userId=" in text and '"currency": "EUR"' in text


def test_assert_tracked_with_a_wrong_count_fails(shop):
    with capture_messages() as cdp:
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
        Payout.objects.create(shop=shop, amount=Decimal("2.00"), currency="EUR")
    cdp.assert_tracked("Payout Created", count=2)
    with pytest.raises(AssertionError, match=r"expected 1 track 'Payout Created'.*found 2"):
        cdp.assert_tracked("Payout Created", count=1)


def test_assert_not_tracked_and_not_identified_fail_with_the_list(shop):
    with capture_messages() as cdp:
        shop.email = "x@acme.example"
        shop.xero_connection_ok = False
        shop.save()
    with pytest.raises(AssertionError, match="expected no track 'Shop Updated', found 1"):
        cdp.assert_not_tracked("Shop Updated")
    cdp.assert_not_tracked("Shop Updated", properties={"domain": "other.example"})
    with pytest.raises(AssertionError, match="expected no identify"):
        cdp.assert_not_identified(shop)
    with pytest.raises(AssertionError, match="traits including"):
        cdp.assert_identified(shop, traits={"email": "old@acme.example"})


def test_subset_match_compares_in_json_form(shop):
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    with capture_messages() as cdp:
        payout = Payout.objects.create(shop=shop, amount=Decimal("0.10"), currency="EUR")
        import django_cdp

        django_cdp.track(payout, "Payout Reviewed", {"at": when, "ratio": 0.1, "ok": True})
    cdp.assert_tracked("Payout Created", properties={"amount": Decimal("0.1")})
    cdp.assert_tracked("Payout Reviewed", properties={"at": when, "ratio": 0.1, "ok": True})
    cdp.assert_not_tracked("Payout Reviewed", properties={"ok": 1})  # True is not 1
    cdp.assert_not_tracked("Payout Reviewed", properties={"missing": None})


def test_coalesced_rows_are_read_back_in_their_final_form(shop):
    with capture_messages() as cdp, transaction.atomic():
        payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
        payout.amount = Decimal("2.00")
        payout.save()
        gone = Payout.objects.create(shop=shop, amount=Decimal("3.00"), currency="EUR")
        gone.delete()

    assert cdp.events == ["Payout Created"]
    cdp.assert_tracked("Payout Created", properties={"amount": Decimal("2.00")})


def test_a_rolled_back_savepoint_takes_its_messages_out_of_the_capture(shop):
    with capture_messages() as cdp, transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
        try:
            with transaction.atomic():
                Payout.objects.create(shop=shop, amount=Decimal("9.00"), currency="EUR")
                raise RuntimeError
        except RuntimeError:
            pass
    cdp.assert_tracked("Payout Created", count=1, properties={"amount": Decimal("1.00")})


def test_clear_forgets_what_was_captured(shop):
    with capture_messages() as cdp:
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
        cdp.clear()
        Payout.objects.create(shop=shop, amount=Decimal("2.00"), currency="EUR")
    cdp.assert_tracked("Payout Created", count=1, properties={"amount": Decimal("2.00")})


def test_backfilled_messages_are_captured_too(transactional_db):
    with tracking_disabled():
        shop = Shop.objects.create(domain="old.example", email="o@old.example")
    with capture_messages() as cdp:
        call_command("cdp_backfill_identify", stdout=io.StringIO())
    cdp.assert_identified(shop, traits={"domain": "old.example", "plan": None})


def test_the_fixture_captures_the_test(cdp_messages, shop):
    assert isinstance(cdp_messages, CapturedMessages)
    cdp_messages.assert_tracked("Shop Created", properties={"domain": "acme.example"})
    cdp_messages.assert_identified(shop, traits={"email": "a@acme.example"})


def test_a_model_django_cdp_does_not_track_is_refused(shop):
    plan = Plan.objects.get()
    with (
        capture_messages() as cdp,
        pytest.raises(TypeError, match="not an instance of a model django-cdp tracks"),
    ):
        cdp.assert_identified(plan)


class TestCaseCoalescing(TestCase):
    """In a TestCase, setUp and the test share one transaction: the documented pitfall."""

    def setUp(self) -> None:
        self.shop = Shop.objects.create(domain="tc.example", email="t@tc.example")

    def test_an_update_in_the_test_is_folded_into_the_created_of_setup(self) -> None:
        with capture_messages() as cdp:
            self.shop.xero_connection_ok = False
            self.shop.save()
        # The Created row of setUp was rewritten in place: nothing new was written.
        cdp.assert_not_tracked("Shop Updated")
        assert cdp.messages == []

    def test_new_transaction_records_the_update_as_its_own_event(self) -> None:
        with capture_messages(new_transaction=True) as cdp:
            self.shop.email = "changed@tc.example"
            self.shop.xero_connection_ok = False
            self.shop.save()
        cdp.assert_tracked("Shop Updated", properties={"xero_connection_ok": False})
        cdp.assert_identified(self.shop, traits={"email": "changed@tc.example"})

    def test_new_transaction_on_one_alias(self) -> None:
        with capture_messages(new_transaction=True, using="default") as cdp:
            self.shop.active = False
            self.shop.save()
        cdp.assert_tracked("Shop Updated", properties={"active": False})
        cdp.assert_not_identified(self.shop)  # traits unchanged


def test_pytest_plugins_registers_the_fixture(tmp_path):
    """``pytest_plugins = ["django_cdp.testing"]`` in a root conftest is all a project needs."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["django_cdp.testing"]\n')
    (tmp_path / "test_user_suite.py").write_text(
        textwrap.dedent(
            """
            from decimal import Decimal

            from example_project.payouts.models import Payout
            from example_project.shops.models import Shop


            def test_payout(cdp_messages, db):
                shop = Shop.objects.create(domain="u.example", email="u@u.example")
                Payout.objects.create(shop=shop, amount=Decimal("5.00"), currency="EUR")
                cdp_messages.assert_tracked("Payout Created", properties={"amount": 5})
                cdp_messages.assert_identified(shop, traits={"domain": "u.example"})
            """
        )
    )
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CDP_TEST_DATABASE": "sqlite",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
