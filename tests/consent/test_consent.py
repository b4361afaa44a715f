"""``CONSENT``: an owner without consent has none of its messages written, on both engines."""

from __future__ import annotations

import copy
import json
from decimal import Decimal

import pytest
from django.contrib.auth.models import AnonymousUser, User
from django.core.management import call_command
from django.db import transaction
from django.template import Context, Template
from django.test import RequestFactory

import django_cdp
from django_cdp import backfill, checks, consent, health
from django_cdp.capture import engines
from django_cdp.models import WithheldCount
from django_cdp.registry import registry
from example_project.payouts.models import Payout
from example_project.shops.models import Shop
from tests.testapp.models import Member


def configure(settings, value, **overrides):
    config = copy.deepcopy(settings.DJANGO_CDP)
    config["CONSENT"] = value
    config.update(overrides)
    settings.DJANGO_CDP = config


def withheld() -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in WithheldCount.objects.all():
        counts[row.event] = counts.get(row.event, 0) + row.n
    return counts


def opted_out_only(shop) -> bool:
    """A CONSENT function: the shop's own opt-in flag."""
    return shop.analytics_opt_in


@pytest.fixture
def opted_out(shop, outbox, settings, engine):
    configure(settings, "analytics_opt_in")
    Shop.objects.filter(pk=shop.pk).update(analytics_opt_in=False)
    outbox.clear()  # the trigger engine saw that update (consent false: nothing written)
    WithheldCount.objects.all().delete()
    shop.refresh_from_db()
    return shop


def test_no_message_of_an_owner_without_consent_is_written(opted_out, outbox):
    payout = Payout.objects.create(shop=opted_out, amount=Decimal("5.00"), currency="EUR")
    payout.amount = Decimal("6.00")
    payout.save()
    opted_out.email = "new@acme.example"  # a trait: would re-identify
    opted_out.active = False  # a property: would be a Shop Updated
    opted_out.save()
    payout.delete()
    assert outbox.all() == []
    assert withheld() == {
        "Payout Created": 1,
        "Payout Updated": 1,
        "Payout Deleted": 1,
        "Shop Updated": 1,
    }


def test_bulk_writes_are_withheld_per_row(opted_out, outbox):
    django_cdp.bulk_create(
        [Payout(shop=opted_out, amount=Decimal(n), currency="EUR") for n in ("1", "2", "3")]
    )
    django_cdp.queryset_update(Payout.objects.filter(shop=opted_out), status="paid")
    assert outbox.all() == []
    assert withheld() == {"Payout Created": 3, "Payout Updated": 3}


def test_owners_with_consent_are_tracked_as_before(opted_out, plan, outbox):
    other = Shop.objects.create(domain="b.example", email="b@b.example", plan=plan)
    Payout.objects.create(shop=other, amount=Decimal("5.00"), currency="EUR")
    Payout.objects.create(shop=opted_out, amount=Decimal("5.00"), currency="EUR")
    assert outbox.events() == ["Shop Created", "Payout Created"]
    assert {m["userId"] for m in outbox.all()} == {str(other.pk)}
    assert withheld() == {"Payout Created": 1}


def test_a_manual_track_is_withheld_and_counted(opted_out, outbox):
    assert django_cdp.track(opted_out, "Report Downloaded", {"pages": 3}) is None
    django_cdp.identify(opted_out, force=True)
    assert outbox.all() == []
    assert withheld() == {"Report Downloaded": 1}


def test_a_rolled_back_change_counts_nothing(opted_out, outbox):
    with pytest.raises(RuntimeError), transaction.atomic():
        Payout.objects.create(shop=opted_out, amount=Decimal("5.00"), currency="EUR")
        raise RuntimeError
    assert withheld() == {}


def test_withdrawing_consent_deletes_nothing_and_giving_it_resumes(shop, outbox, settings, engine):
    configure(settings, "analytics_opt_in")
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    shop.analytics_opt_in = False
    shop.save()
    Payout.objects.create(shop=shop, amount=Decimal("2.00"), currency="EUR")
    shop.email = "new@acme.example"
    shop.save()
    assert outbox.events() == ["Payout Created"]  # the past message stays
    shop.analytics_opt_in = True
    shop.save()
    Payout.objects.create(shop=shop, amount=Decimal("3.00"), currency="EUR")
    assert [m["properties"].get("amount") for m in outbox.tracks()] == [
        Decimal("1.00"),
        Decimal("3.00"),
    ]
    # Identified again once consent is back, with the traits changed meanwhile.
    assert [m["type"] for m in outbox.all()] == ["track", "identify", "track"]
    assert outbox.identifies()[0]["traits"]["email"] == "new@acme.example"


def test_the_health_report_and_cdp_health_show_the_withheld_events(opted_out, capsys):
    Payout.objects.create(shop=opted_out, amount=Decimal("5.00"), currency="EUR")
    Payout.objects.create(shop=opted_out, amount=Decimal("6.00"), currency="EUR")
    assert health.report()["withheld"] == [
        {"event": "Payout Created", "hour": 2, "day": 2, "week": 2}
    ]
    call_command("cdp_health", "--json")
    out = capsys.readouterr().out
    assert json.loads(out)["withheld"][0]["event"] == "Payout Created"


def test_the_snippet_renders_nothing_for_an_owner_without_consent(opted_out, settings):
    frontend = {
        "WRITE_KEY": "fe-key",
        "DATA_PLANE_URL": "http://127.0.0.1:8089",
        "SDK_URL": "http://127.0.0.1:8089/sdk/rsa.min.js",
    }
    configure(settings, "analytics_opt_in", FRONTEND=frontend, LOGIN={"owner": "member__shop"})
    user = User.objects.create_user("ann", password="pw")
    Member.objects.create(user=user, shop=opted_out)

    def render(who) -> str:
        request = RequestFactory().get("/")
        request.user = who
        return Template("{% load cdp %}{% cdp_snippet %}").render(Context({"request": request}))

    assert render(user) == ""
    assert render(AnonymousUser()).startswith("<script>")  # nobody known: nothing to refuse
    Shop.objects.filter(pk=opted_out.pk).update(analytics_opt_in=True)
    assert render(user).startswith("<script>")


def test_backfill_skips_owners_without_consent(opted_out, plan, outbox):
    other = Shop.objects.create(domain="b.example", email="b@b.example", plan=plan)
    outbox.clear()
    queryset = backfill.identity_queryset("default")
    result = backfill.backfill_identify(queryset, using="default", force=True, total=2)
    assert result.withheld == 1
    assert result.queued == 1
    assert result.done == 2
    assert [m["userId"] for m in outbox.identifies()] == [str(other.pk)]


def test_cdp_backfill_identify_reports_the_skipped_owners(opted_out, capsys):
    call_command("cdp_backfill_identify", "--force")
    assert "1 without consent (skipped)" in capsys.readouterr().out


def test_the_created_backfill_skips_the_objects_of_owners_without_consent(opted_out, plan, outbox):
    other = Shop.objects.create(domain="b.example", email="b@b.example", plan=plan)
    mine = Payout.objects.create(shop=other, amount=Decimal("2.00"), currency="EUR")
    Payout.objects.create(shop=opted_out, amount=Decimal("3.00"), currency="EUR")
    outbox.clear()
    WithheldCount.objects.all().delete()  # the live create's count
    [config] = [c for c in backfill.created_configs() if c.model is Payout]
    result = backfill.backfill_created(
        config,
        backfill.created_queryset(config, None, "default"),
        timestamp_field="created_at",
        using="default",
        total=2,
    )
    assert (result.withheld, result.queued, result.done) == (1, 1, 2)
    [track] = outbox.tracks()
    assert (track["event"], track["userId"]) == ("Payout Created", str(other.pk))
    assert track["properties"]["id"] == mine.pk
    assert withheld() == {}  # a backfill is not live traffic: the health page counts nothing


def test_cdp_backfill_identify_track_created_reports_the_skipped_objects(opted_out, capsys):
    Payout.objects.create(shop=opted_out, amount=Decimal("3.00"), currency="EUR")
    call_command("cdp_backfill_identify", "--track-created")
    out = capsys.readouterr().out
    assert "Payout Created: 0 queued" in out and "1 without consent (skipped)" in out


# --- a function -------------------------------------------------------------------------------


def test_a_function_decides_and_sends_every_model_to_the_signal_engine(shop, outbox, settings):
    configure(settings, "tests.consent.test_consent.opted_out_only", CAPTURE="auto")
    for config in registry:
        choice = engines.choose(config, "postgresql")
        assert choice.engine == engines.SIGNALS
        assert "DJANGO_CDP['CONSENT']" in choice.reason
    Shop.objects.filter(pk=shop.pk).update(analytics_opt_in=False)
    outbox.clear()
    Payout.objects.create(shop=shop, amount=Decimal("5.00"), currency="EUR")
    assert outbox.all() == []
    assert withheld() == {"Payout Created": 1}


def test_a_function_that_raises_withholds(shop, outbox, settings, caplog):
    configure(settings, "tests.consent.test_consent.broken")
    Payout.objects.create(shop=shop, amount=Decimal("5.00"), currency="EUR")
    assert outbox.all() == []
    assert "messages are withheld" in caplog.text


def broken(shop):
    raise LookupError("consent service down")


# --- checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, words",
    [
        ("analytics_optin", ["does not resolve", "Did you mean 'analytics_opt_in'?"]),
        ("domain", ["CharField", "not a BooleanField"]),
        ("tests.consent.test_consent.nothing_here", ["cannot be imported"]),
        ("plan__nme", ["does not resolve"]),
    ],
)
def test_a_broken_consent_fails_check_naming_the_key(settings, db, value, words):
    configure(settings, value)
    [problem] = consent.check_consent()
    assert problem.id == "django_cdp.E015"
    assert "DJANGO_CDP['CONSENT']" in problem.msg
    for word in words:
        assert word in problem.msg


@pytest.mark.postgres
def test_a_function_with_triggers_forced_is_e013_naming_consent(settings, db):
    configure(settings, "tests.consent.test_consent.opted_out_only", CAPTURE="triggers")
    problems = [m for m in checks.check_capture() if m.id == "django_cdp.E013"]
    assert problems
    assert all("DJANGO_CDP['CONSENT']" in m.msg for m in problems)


def test_a_field_path_keeps_the_trigger_engine(settings, db):
    configure(settings, "analytics_opt_in", CAPTURE="auto")
    assert all(engines.choose(c, "postgresql").engine == engines.TRIGGERS for c in registry)
