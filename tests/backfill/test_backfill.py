"""``manage.py cdp_backfill_identify``: every flag, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime
import io
import json
from decimal import Decimal

import pytest
from django.core.management import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from django_cdp import backfill as backfill_module
from django_cdp.capture.owners import read_traits
from django_cdp.models import Message, TraitsDigest
from django_cdp.signals import message_created
from example_project.payouts.models import Payout
from example_project.shops.models import Plan, Shop
from tests.backfill.conftest import identifies, tracks
from tests.conftest import DATABASE
from tests.settings import DJANGO_CDP


def test_every_shop_is_identified_once_with_the_traits_the_core_would_send(backfill, legacy_shops):
    shops = legacy_shops(5)

    run = backfill()

    sent = identifies()
    assert [m["userId"] for m in sent] == [str(s.pk) for s in shops]
    assert sent[0]["traits"] == {
        "domain": "shop0.example",
        "email": "owner@shop0.example",
        "xero_connection_ok": True,
        "plan": "Growth",
    }
    assert sent[0]["context"]["traits"] == sent[0]["traits"]
    assert sent[0]["context"]["library"]["name"] == "django-cdp"
    rows = Message.objects.filter(type="identify")
    assert {r.status for r in rows} == {"pending"}
    assert {r.source_model for r in rows} == {"shops.shop"}
    # Digests recorded as the core computes them: it now skips an unchanged identify.
    digests = dict(TraitsDigest.objects.values_list("user_id", "digest"))
    owner = (shops[0].pk, str(shops[0].pk))
    assert digests[str(shops[0].pk)] == read_traits(owner, "default", None).digest
    assert "identify: 5 queued, 0 skipped (unchanged), 0 error(s)" in run.stdout


def test_the_digest_matches_the_core_so_a_later_unchanged_save_sends_no_identify(
    backfill, legacy_shops
):
    (shop,) = legacy_shops(1)
    backfill()
    Message.objects.all().delete()

    shop.active = False  # a tracked property, not a trait
    shop.save()

    assert list(Message.objects.values_list("event", flat=True)) == ["Shop Updated"]


def test_a_second_run_queues_nothing(backfill, legacy_shops):
    legacy_shops(4)
    backfill()

    run = backfill()

    assert len(identifies()) == 4
    assert "identify: 0 queued, 4 skipped (unchanged), 0 error(s)" in run.stdout


def test_shops_identified_by_live_tracking_are_skipped_and_changed_ones_sent(backfill, plans):
    live = Shop.objects.create(domain="live.example", email="l@live.example", plan=plans["Growth"])
    changed = Shop.objects.create(domain="ch.example", email="c@ch.example", plan=plans["Growth"])
    Shop.objects.filter(pk=changed.pk).update(email="new@ch.example")  # no signal: digest stale
    Message.objects.all().delete()

    run = backfill()

    assert [m["userId"] for m in identifies()] == [str(changed.pk)]
    assert identifies()[0]["traits"]["email"] == "new@ch.example"
    assert "1 queued, 1 skipped (unchanged)" in run.stdout
    assert live.pk


def test_force_sends_unchanged_traits_too(backfill, legacy_shops):
    legacy_shops(3)
    backfill()

    run = backfill("--force")

    assert len(identifies()) == 6
    assert "identify: 3 queued, 0 skipped" in run.stdout


def test_pk_selects_rows_repeated_or_comma_separated(backfill, legacy_shops):
    shops = legacy_shops(5)

    backfill("--pk", str(shops[0].pk), "--pk", f"{shops[2].pk},{shops[3].pk}")

    assert sorted(int(m["userId"]) for m in identifies()) == [
        shops[0].pk,
        shops[2].pk,
        shops[3].pk,
    ]


def test_since_selects_by_date_field(backfill, legacy_shops):
    shops = legacy_shops(3)
    old = timezone.now() - datetime.timedelta(days=400)
    Shop.objects.filter(pk=shops[0].pk).update(created_at=old)
    Shop.objects.filter(pk=shops[1].pk).update(created_at=old + datetime.timedelta(days=300))

    since = (old + datetime.timedelta(days=200)).date().isoformat()
    backfill("--since", since, "--date-field", "created_at")

    assert sorted(int(m["userId"]) for m in identifies()) == [shops[1].pk, shops[2].pk]


def test_since_accepts_an_iso_datetime(backfill, legacy_shops):
    shops = legacy_shops(2)
    Shop.objects.filter(pk=shops[0].pk).update(
        created_at=datetime.datetime(2020, 1, 1, 12, tzinfo=datetime.timezone.utc)
    )

    backfill("--since", "2020-01-01T13:00:00+00:00", "--date-field", "created_at")

    assert [int(m["userId"]) for m in identifies()] == [shops[1].pk]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--since", "2020-01-01"], "--since needs --date-field"),
        (["--since", "yesterday", "--date-field", "created_at"], "expected YYYY-MM-DD"),
        (["--since", "2020-01-01", "--date-field", "nope"], "Invalid selection"),
        (["--since", "2020-01-01", "--date-field", "domain"], "is not a date field"),
        (["--filter", "nope=1"], "Invalid selection"),
        (["--filter", "domain"], "expected LOOKUP=VALUE"),
        (["--batch-size", "0"], "argument --batch-size: expected a whole number of at least 1"),
        (["--dry-run", "--deliver"], "nothing to --deliver"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    backfill, legacy_shops, args, message
):
    legacy_shops(1)
    with pytest.raises(CommandError, match=message):
        backfill(*args)
    assert not Message.objects.exists()


def test_filter_selects_by_orm_lookup_and_several_filters_all_apply(backfill, legacy_shops):
    growth = legacy_shops(2, plan="Growth")
    scale = legacy_shops(2, plan="Scale", start=10)
    Shop.objects.filter(pk=scale[0].pk).update(active=False)

    backfill("--filter", "plan__name=Scale", "--filter", "active=True")
    assert [int(m["userId"]) for m in identifies()] == [scale[1].pk]

    backfill("--filter", "plan__name=Growth")
    assert len(identifies()) == 3
    assert growth


def test_batches_use_a_fixed_number_of_queries(backfill, legacy_shops):
    legacy_shops(30)
    with CaptureQueriesContext(connection) as ctx:
        backfill("--batch-size", "10")
    if DATABASE == "postgres":
        # The database computes and writes each batch in one statement, as the triggers do.
        batches = [q for q in ctx.captured_queries if q["sql"].startswith("WITH v AS")]
        assert len(batches) == 3
        # count, the schemas the statement is written for, pks; per batch BEGIN, it, COMMIT
        assert len(ctx.captured_queries) <= 3 + 3 * 3
        assert len(identifies()) == 30
        return
    selects_of_digests = [q for q in ctx.captured_queries if "django_cdp_traitsdigest" in q["sql"]]
    message_inserts = [
        q for q in ctx.captured_queries if q["sql"].startswith('INSERT INTO "django_cdp_message"')
    ]
    assert len(message_inserts) == 3  # one bulk insert per batch
    assert len(selects_of_digests) == 6  # one digest read and one digest upsert per batch
    # count, then per batch: rows, digests, messages, digest upsert (+ transaction statements)
    assert len(ctx.captured_queries) <= 2 + 3 * 8
    assert len(identifies()) == 30


def test_dry_run_counts_and_prints_one_sample_payload_without_writing(backfill, legacy_shops):
    shops = legacy_shops(3)

    run = backfill("--dry-run")

    assert not Message.objects.exists()
    assert not TraitsDigest.objects.exists()
    assert "identify: 3 would queue, 0 skipped (unchanged), 0 error(s)" in run.stdout
    assert "Dry run: nothing was written." in run.stdout
    sample = json.loads(run.stdout.split("Sample payload:\n", 1)[1].splitlines()[0])
    assert sample["type"] == "identify"
    assert sample["userId"] == str(shops[0].pk)
    assert sample["traits"]["plan"] == "Growth"


def test_dry_run_after_a_run_says_nothing_would_be_queued(backfill, legacy_shops):
    legacy_shops(2)
    backfill()
    run = backfill("--dry-run")
    assert "0 would queue, 2 skipped" in run.stdout
    assert "No message would be queued." in run.stdout


@override_settings(DJANGO_CDP={**DJANGO_CDP, "SEND": False})
def test_deliver_drains_the_outbox_in_the_foreground(backfill, legacy_shops):
    legacy_shops(3)

    run = backfill("--deliver")

    assert "deliver: " in run.stdout
    # SEND = False: delivery decides, and records them as skipped.
    assert set(Message.objects.values_list("status", flat=True)) == {"skipped"}


def test_track_created_replays_history_with_original_timestamps_once(backfill, legacy_shops):
    shops = legacy_shops(2)
    with backfill_module_tracking_off():
        payout = Payout.objects.create(shop=shops[1], amount=Decimal("12.50"), currency="EUR")
    when = datetime.datetime(2021, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)
    Payout.objects.filter(pk=payout.pk).update(created_at=when)
    Shop.objects.filter(pk=shops[0].pk).update(created_at=when)

    run = backfill("--track-created")

    events = {(m["event"], m["properties"]["id"]): m for m in tracks()}
    assert set(events) == {
        ("Shop Created", shops[0].pk),
        ("Shop Created", shops[1].pk),
        ("Payout Created", payout.pk),
    }
    payout_created = events[("Payout Created", payout.pk)]
    assert payout_created["originalTimestamp"] == "2021-03-04T05:06:07Z"
    assert payout_created["userId"] == str(shops[1].pk)
    assert payout_created["properties"] == {
        "id": payout.pk,
        "amount": Decimal("12.50"),
        "currency": "EUR",
        "status": "pending",
    }
    assert events[("Shop Created", shops[0].pk)]["originalTimestamp"] == "2021-03-04T05:06:07Z"
    assert payout_created["messageId"] == backfill_module.created_message_id(
        backfill_module.registry.get(Payout), payout.pk
    )
    assert "Payout Created: 1 queued, 0 skipped (already in the outbox)" in run.stdout
    assert len(identifies()) == 2

    again = backfill("--track-created")
    assert len(tracks()) == 3
    assert "Payout Created: 0 queued, 1 skipped (already in the outbox)" in again.stdout


def test_track_created_skips_objects_whose_created_event_is_already_in_the_outbox(backfill, plans):
    shop = Shop.objects.create(domain="a.example", email="a@a.example", plan=plans["Growth"])
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")

    run = backfill("--track-created")

    assert sorted(m["event"] for m in tracks()) == ["Payout Created", "Shop Created"]
    assert "Payout Created: 0 queued, 1 skipped" in run.stdout


def test_track_created_is_limited_to_the_selected_owners(backfill, legacy_shops):
    shops = legacy_shops(2)
    with backfill_module_tracking_off():
        for shop in shops:
            Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")

    backfill("--track-created", "--pk", str(shops[0].pk))

    assert {m["userId"] for m in tracks()} == {str(shops[0].pk)}
    assert [m["event"] for m in tracks()] == ["Shop Created", "Payout Created"]


def test_track_created_reports_models_without_a_creation_field(backfill, legacy_shops):
    legacy_shops(1)
    run = backfill("--track-created")
    # accounting.Mapping and ShopSettings have no creation timestamp field.
    assert "accounting.Mapping: no creation date field" in run.stderr


def test_track_created_uses_date_field_when_the_model_has_it(backfill, legacy_shops):
    (shop,) = legacy_shops(1)
    Shop.objects.filter(pk=shop.pk).update(
        last_payout_at=datetime.datetime(2019, 1, 1, tzinfo=datetime.timezone.utc)
    )
    backfill("--track-created", "--date-field", "last_payout_at", "--since", "2000-01-01")
    (created,) = [m for m in tracks() if m["event"] == "Shop Created"]
    assert created["originalTimestamp"] == "2019-01-01T00:00:00Z"


def test_a_row_whose_traits_raise_is_stored_failed_with_its_reason_and_the_run_goes_on(
    backfill, legacy_shops, monkeypatch
):
    shops = legacy_shops(4)
    bad = shops[2].pk

    def risky(self):
        if self.pk == bad:
            raise RuntimeError("the CRM is down")
        return "ok"

    monkeypatch.setattr(Shop, "risky", property(risky), raising=False)
    traits = {**DJANGO_CDP["IDENTITY"]["traits"], "risky": "risky"}
    settings = {**DJANGO_CDP, "IDENTITY": {**DJANGO_CDP["IDENTITY"], "traits": traits}}
    out = io.StringIO()
    with override_settings(DJANGO_CDP=settings), pytest.raises(CommandError) as exc:
        backfill("--batch-size", "2", stdout=out)

    assert exc.value.returncode == 1
    pending = Message.objects.filter(type="identify", status="pending")
    assert sorted(int(m.user_id) for m in pending) == sorted(s.pk for s in shops if s.pk != bad)
    failed = Message.objects.get(status="failed")
    assert failed.last_error == (
        f"shops.Shop pk={bad}: risky: risky raised RuntimeError: the CRM is down"
    )
    assert "1 stored as failed" in out.getvalue()


def test_an_enrich_hook_that_raises_is_reported_per_row(backfill, legacy_shops):
    shops = legacy_shops(2)
    settings = {**DJANGO_CDP, "ENRICH_MESSAGE": "tests.backfill.hooks.fail_for_odd"}
    with override_settings(DJANGO_CDP=settings), pytest.raises(CommandError):
        backfill()
    rows = Message.objects.filter(type="identify").order_by("id")
    assert sorted(r.status for r in rows) == ["failed", "pending"]
    (failed,) = [r for r in rows if r.status == "failed"]
    assert failed.last_error.startswith(f"shops.Shop pk={failed.source_pk}: ")
    assert shops


def test_unsendable_messages_are_stored_failed_and_make_the_exit_code_non_zero(
    backfill, legacy_shops
):
    legacy_shops(2)
    settings = {**DJANGO_CDP, "MAX_MESSAGE_BYTES": 100}
    out = io.StringIO()
    with override_settings(DJANGO_CDP=settings), pytest.raises(CommandError, match="cannot be"):
        backfill(stdout=out)
    assert set(Message.objects.values_list("status", flat=True)) == {"failed"}
    assert not TraitsDigest.objects.exists()  # sent again once the limit allows
    assert "2 stored as failed" in out.getvalue()


def _fail_batch(monkeypatch, number: int, error: BaseException) -> None:
    """Make the ``number``-th batch's write raise ``error`` (after the earlier ones committed).

    On PostgreSQL the database writes each batch itself (``_identify_in_database``);
    elsewhere Python writes the rows it built (``_write``).
    """
    name = "_identify_in_database" if DATABASE == "postgres" else "_write"
    real = getattr(backfill_module, name)
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(backfill_module, name, write)


def test_interrupted_run_then_rerun_queues_only_the_rest(backfill, legacy_shops, monkeypatch):
    shops = legacy_shops(10)
    with monkeypatch.context() as patched:
        _fail_batch(patched, 3, ConnectionError("lost the database"))
        with pytest.raises(ConnectionError):
            backfill("--batch-size", "3")
    assert len(identifies()) == 6  # two committed batches

    run = backfill("--batch-size", "3")

    assert "identify: 4 queued, 6 skipped (unchanged)" in run.stdout
    assert sorted(int(m["userId"]) for m in identifies()) == [s.pk for s in shops]


def test_keyboard_interrupt_prints_the_summary_and_exits_130(backfill, legacy_shops, monkeypatch):
    legacy_shops(4)
    _fail_batch(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(CommandError, match="run the command again") as exc:
        backfill("--batch-size", "2")
    assert exc.value.returncode == 130
    assert len(identifies()) == 2


def test_progress_on_a_pipe_is_plain_lines_with_a_final_count(backfill, legacy_shops):
    legacy_shops(3)
    run = backfill()
    assert "\r" not in run.stdout
    assert "identify: 3/3 (100%)" in run.stdout


def test_progress_on_a_terminal_is_one_updating_line(backfill, legacy_shops):
    legacy_shops(3)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    backfill("--batch-size", "1", stdout=out)
    text = out.getvalue()
    assert "\r\x1b[2Kidentify: 3/3 (100%)" in text
    assert text.count("\n") == 2  # the progress line ends once, then the summary


def test_progress_line_shows_rate_and_eta():
    from django_cdp.management.commands.cdp_backfill_identify import Progress

    progress = Progress(io.StringIO(), "identify", 1000, tty=False)
    progress.started -= 10
    progress.done = 100
    line = progress.line()
    assert line.startswith("identify: 100/1,000 (10%), 10/s, ETA 0:01:30")


def test_message_created_is_sent_for_every_bulk_written_row(backfill, legacy_shops):
    legacy_shops(3)
    seen = []

    def receiver(sender, message, **kwargs):
        seen.append(message.pk)

    message_created.connect(receiver)
    try:
        backfill()
    finally:
        message_created.disconnect(receiver)
    assert sorted(seen) == sorted(Message.objects.values_list("pk", flat=True))
    assert None not in seen


def test_disabled_django_cdp_refuses_to_backfill(backfill, legacy_shops):
    legacy_shops(1)
    disabled = override_settings(DJANGO_CDP={**DJANGO_CDP, "ENABLED": False})
    with disabled, pytest.raises(CommandError, match="ENABLED"):
        backfill()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_database_option_reads_and_writes_that_alias(legacy_shops):
    from django.core.management import call_command

    legacy_shops(2, using="other")
    call_command("cdp_backfill_identify", "--database", "other", stdout=io.StringIO())
    assert len(identifies("other")) == 2
    assert not Message.objects.using("default").exists()
    assert TraitsDigest.objects.using("other").count() == 2


def test_a_foreign_key_pointing_nowhere_is_reported(backfill, legacy_shops):
    """A non-null FK on a trait path that points nowhere drops out of the join: reported."""
    from tests.testapp.models import Customer, Order

    (shop,) = legacy_shops(1)
    with backfill_module_tracking_off():
        customer = Customer.objects.create(shop=shop, name="Ann")
        good = Order.objects.create(customer=customer, total=1, placed_at=timezone.now())
        bad = Order.objects.create(customer=customer, total=2, placed_at=timezone.now())
    _break_foreign_key(Order, bad.pk, "customer_id", 999_999)
    settings = {
        **DJANGO_CDP,
        "IDENTITY": {"model": "testapp.Order", "traits": {"customer": "customer__name"}},
        "MODELS": {},
    }
    err = io.StringIO()
    from django.core.management import call_command

    if DATABASE == "postgres":
        with override_settings(DJANGO_CDP=settings):
            call_command("cdp_backfill_identify", stdout=io.StringIO(), stderr=err)
        # The database computes the traits: a foreign key pointing nowhere reads as no row.
        sent = {m["userId"]: m["traits"] for m in identifies()}
        assert sent == {str(good.pk): {"customer": "Ann"}, str(bad.pk): {"customer": None}}
        return
    with override_settings(DJANGO_CDP=settings), pytest.raises(CommandError):
        call_command("cdp_backfill_identify", stdout=io.StringIO(), stderr=err)
    assert f"pk={bad.pk!r}: a foreign key on a trait path points to a missing row" in (
        err.getvalue()
    )
    assert [m["userId"] for m in identifies()] == [str(good.pk)]


def _break_foreign_key(model, pk, column, value) -> None:
    table = model._meta.db_table
    if connection.vendor == "sqlite":
        with connection.constraint_checks_disabled(), connection.cursor() as cursor:
            cursor.execute(f'UPDATE "{table}" SET "{column}" = %s WHERE id = %s', [value, pk.hex])
    else:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER TABLE "{table}" DISABLE TRIGGER ALL')
            cursor.execute(f'UPDATE "{table}" SET "{column}" = %s WHERE id = %s', [value, pk])
            cursor.execute(f'ALTER TABLE "{table}" ENABLE TRIGGER ALL')


@pytest.mark.postgres
def test_postgres_streams_with_a_server_side_cursor_across_batch_commits(
    backfill, legacy_shops, monkeypatch
):
    """The cursor is declared WITH HOLD in autocommit, so it survives each batch's commit."""
    legacy_shops(25)
    named = []
    real_chunked = connection.chunked_cursor

    def spy():
        cursor = real_chunked()
        named.append(getattr(cursor, "name", None))
        return cursor

    monkeypatch.setattr(connection, "chunked_cursor", spy)
    run = backfill("--batch-size", "4")

    assert named and all(named)  # a named (server-side) cursor
    assert "identify: 25 queued" in run.stdout
    assert len({m["userId"] for m in identifies()}) == 25


def backfill_module_tracking_off():
    from django_cdp.scope import tracking_disabled

    return tracking_disabled()


def test_plan_fixture_is_untracked(plans):
    assert Plan.objects.count() == 2
    assert not Message.objects.exists()


def test_backfilled_identifies_are_validated_like_single_writes(backfill, legacy_shops):
    """VALIDATION = "block": a trait outside the plan is stored blocked, its digest unwritten."""
    legacy_shops(2)
    settings = {
        **DJANGO_CDP,
        "VALIDATION": "block",
        "ENRICH_MESSAGE": "tests.validation.hooks.nickname_trait",
    }
    out = io.StringIO()
    with override_settings(DJANGO_CDP=settings), pytest.raises(CommandError):
        backfill(stdout=out)
    rows = list(Message.objects.all())
    assert {r.status for r in rows} == {"blocked"}
    assert rows[0].violations[0]["type"] == "Additional-Properties"
    assert not TraitsDigest.objects.exists()
    assert "2 stored as failed or blocked" in out.getvalue()


def test_backfilled_identifies_are_flagged_in_flag_mode(backfill, legacy_shops):
    legacy_shops(1)
    settings = {**DJANGO_CDP, "ENRICH_MESSAGE": "tests.validation.hooks.nickname_trait"}
    with override_settings(DJANGO_CDP=settings):
        backfill()
    (row,) = Message.objects.all()
    assert row.status == "pending" and row.violations
