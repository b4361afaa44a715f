"""Model changes become track and identify messages in the outbox, in the change's transaction."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal

import pytest
from django.db import transaction

from django_cdp.models import Message, TraitsDigest
from example_project.accounting.models import ShopSettings
from example_project.payouts.models import Payout
from example_project.shops.models import Plan, Shop


class Boom(Exception):
    pass


# --- the example project's acceptance scenario ---------------------------------------------------


def test_creating_a_shop_tracks_it_and_identifies_it_with_exactly_the_mapped_traits(outbox, plan):
    shop = Shop.objects.create(domain="acme.example", email="a@acme.example", plan=plan)

    assert outbox.events() == ["Shop Created"]
    (track,) = outbox.tracks()
    assert track["userId"] == str(shop.pk)
    assert track["properties"] == {
        "id": shop.pk,
        "domain": "acme.example",
        "active": True,
        "xero_connection_ok": True,
    }
    (identify,) = outbox.identifies()
    assert identify["userId"] == str(shop.pk)
    assert identify["traits"] == {
        "domain": "acme.example",
        "email": "a@acme.example",
        "xero_connection_ok": True,
        "plan": "Growth",
    }
    assert identify["context"]["traits"] == identify["traits"]


def test_a_payout_for_a_known_shop_tracks_it_and_skips_the_unchanged_identify(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("120.50"), currency="EUR")

    assert outbox.events() == ["Payout Created"]
    assert outbox.identifies() == []
    (track,) = outbox.tracks()
    assert track["userId"] == str(shop.pk)
    assert track["properties"] == {
        "id": payout.pk,
        "amount": Decimal("120.50"),
        "currency": "EUR",
        "status": "pending",
    }


def test_a_trait_change_tracks_the_update_and_identifies_with_the_new_trait(outbox, shop):
    shop.xero_connection_ok = False
    shop.save()

    (track,) = outbox.tracks()
    assert track["event"] == "Shop Updated"
    assert track["properties"]["changed_fields"] == ["xero_connection_ok"]
    assert track["properties"]["xero_connection_ok"] is False
    (identify,) = outbox.identifies()
    assert identify["traits"]["xero_connection_ok"] is False


def test_a_rolled_back_create_leaves_nothing(outbox, plan):
    with pytest.raises(Boom), transaction.atomic():
        Shop.objects.create(domain="gone.example", email="g@gone.example", plan=plan)
        raise Boom
    assert outbox.rows() == []
    assert not TraitsDigest.objects.exists()


def test_a_save_with_no_tracked_change_leaves_nothing(outbox, shop):
    shop.save()
    Shop.objects.get(pk=shop.pk).save()
    assert outbox.rows() == []


# --- message format ----------------------------------------------------------------------------


def test_track_message_has_the_fields_the_http_api_expects(outbox, shop):
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    (row,) = outbox.rows()
    (message,) = outbox.all()
    assert row.message_id == message["messageId"]
    uuid.UUID(message["messageId"])
    assert row.status == Message.Status.PENDING
    assert row.source_model == "payouts.payout"
    assert message["type"] == "track"
    assert message["originalTimestamp"].endswith("Z")
    assert "timestamp" not in message
    assert "sentAt" not in message
    assert message["context"]["library"]["name"] == "django-cdp"
    assert message["integrations"] == {"All": True}
    assert isinstance(message["userId"], str)


def test_message_ids_are_time_ordered_uuids(outbox, shop):
    """Version 7 UUIDs: ids written later sort later (they land on the rightmost leaf of the
    outbox's unique index instead of a random one)."""
    before = time.time_ns() // 1_000_000
    for amount in ("1.00", "2.00", "3.00"):
        with transaction.atomic():
            Payout.objects.create(shop=shop, amount=Decimal(amount), currency="EUR")
    after = time.time_ns() // 1_000_000
    ids = [uuid.UUID(m["messageId"]) for m in outbox.tracks()]
    assert [i.version for i in ids] == [7, 7, 7]
    assert all(i.variant == uuid.RFC_4122 for i in ids)
    millis = [i.int >> 80 for i in ids]
    # the database's clock and ours may differ by a few milliseconds on one machine
    assert all(before - 1000 <= m <= after + 1000 for m in millis)
    assert millis == sorted(millis)
    assert len(set(ids)) == 3


@pytest.mark.signals_only(
    reason="the trigger engine stores jsonb's text, with a space after each separator"
)
def test_payload_is_compact_json_with_decimals_as_exact_numbers(outbox, shop):
    Payout.objects.create(shop=shop, amount=Decimal("0.10"), currency="EUR")
    (row,) = outbox.rows()
    assert '"amount":0.10,' in row.payload
    assert ": " not in row.payload


def test_event_name_override_and_integrations(outbox, shop, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {
            "payouts.Payout": {
                "owner": "shop",
                "properties": ["amount"],
                "event_names": {"created": "Payout Sent"},
                "integrations": {"All": True, "Intercom": False},
            }
        },
    }
    Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
    (track,) = outbox.tracks()
    assert track["event"] == "Payout Sent"
    assert track["integrations"] == {"All": True, "Intercom": False}


def test_multi_word_verbose_name_is_title_cased(outbox, shop, settings):
    from tests.testapp.models import WorkspaceProject

    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {"testapp.WorkspaceProject": {"owner": "shop", "properties": ["title"]}},
    }
    project = WorkspaceProject.objects.create(shop=shop, title="Q4", secret="hunter2")
    assert outbox.events() == ["Workspace Project Created"]
    assert outbox.tracks()[0]["properties"] == {"id": project.pk, "title": "Q4"}
    assert "hunter2" not in outbox.rows()[0].payload


def test_events_option_limits_what_is_tracked(outbox, shop, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {"payouts.Payout": {"owner": "shop", "events": ["deleted"], "properties": []}},
    }
    payout = Payout.objects.create(shop=shop, amount=Decimal("5"), currency="EUR")
    payout.amount = Decimal("6")
    payout.save()
    assert outbox.rows() == []
    payout.delete()
    assert outbox.events() == ["Payout Deleted"]


# --- updates -----------------------------------------------------------------------------------


def test_update_carries_changed_fields_and_final_values(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    payout.amount = Decimal("12.00")
    payout.status = Payout.Status.PAID
    payout.save()
    (track,) = outbox.tracks()
    assert track["event"] == "Payout Updated"
    assert track["properties"]["changed_fields"] == ["amount", "status"]
    assert track["properties"]["status"] == "paid"


def test_equal_value_in_another_form_is_not_a_change(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    payout.amount = "10.0"
    payout.save()
    assert outbox.rows() == []


def test_untracked_field_change_is_not_an_update(outbox, shop):
    shop.last_payout_at = shop.created_at
    shop.save()
    assert outbox.rows() == []


def test_update_fields_limits_what_is_compared(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    payout.amount = Decimal("99.00")
    payout.currency = "USD"
    payout.save(update_fields=["currency"])
    (track,) = outbox.tracks()
    assert track["properties"]["changed_fields"] == ["currency"]


@pytest.mark.signals_only(reason="counts the signal engine's statements")
def test_update_fields_without_tracked_fields_reads_no_tracked_columns(
    outbox, shop, django_assert_num_queries
):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    with django_assert_num_queries(2) as queries:
        payout.save(update_fields=["created_at"])
    # the UPDATE, then the owner's traits with their digest (unchanged: nothing written)
    assert [q["sql"].split()[0] for q in queries] == ["UPDATE", "SELECT"]
    assert outbox.rows() == []


def test_queryset_changes_made_outside_the_instance_are_compared_with_the_database(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    Payout.objects.filter(pk=payout.pk).update(currency="USD")
    outbox.clear()
    payout.save()  # writes EUR back over USD: a real change
    (track,) = outbox.tracks()
    assert track["properties"]["changed_fields"] == ["currency"]


# --- one event per object per transaction ------------------------------------------------------


def test_several_saves_in_one_transaction_give_one_update_with_final_values(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    with transaction.atomic():
        payout.amount = Decimal("11.00")
        payout.save()
        payout.status = Payout.Status.PAID
        payout.save()
        payout.amount = Decimal("13.00")
        payout.save()
    (track,) = outbox.tracks()
    assert track["event"] == "Payout Updated"
    assert track["properties"]["amount"] == Decimal("13.00")
    assert track["properties"]["changed_fields"] == ["amount", "status"]


def test_changes_that_cancel_out_in_one_transaction_leave_nothing(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    with transaction.atomic():
        payout.amount = Decimal("11.00")
        payout.save()
        payout.amount = Decimal("10.00")
        payout.save()
    assert outbox.rows() == []


def test_create_then_update_gives_one_created_with_final_values(outbox, shop):
    with transaction.atomic():
        payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
        payout.status = Payout.Status.PAID
        payout.save()
    (track,) = outbox.tracks()
    assert track["event"] == "Payout Created"
    assert track["properties"]["status"] == "paid"
    assert "changed_fields" not in track["properties"]


def test_update_then_delete_gives_only_deleted(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    with transaction.atomic():
        payout.amount = Decimal("11.00")
        payout.save()
        payout.delete()
    assert outbox.events() == ["Payout Deleted"]
    assert outbox.tracks()[0]["properties"]["amount"] == Decimal("11.00")


def test_create_then_delete_gives_nothing(outbox, shop):
    with transaction.atomic():
        payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
        payout.delete()
    assert outbox.rows() == []


def test_separate_transactions_give_separate_events(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    payout.amount = Decimal("11.00")
    payout.save()
    assert outbox.events() == ["Payout Created", "Payout Updated"]


# --- savepoints --------------------------------------------------------------------------------


def test_a_rolled_back_savepoint_takes_its_messages_with_it(outbox, shop):
    with transaction.atomic():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
        with pytest.raises(Boom), transaction.atomic():
            Payout.objects.create(shop=shop, amount=Decimal("2.00"), currency="EUR")
            raise Boom
        Payout.objects.create(shop=shop, amount=Decimal("3.00"), currency="EUR")
    assert [t["properties"]["amount"] for t in outbox.tracks()] == [
        Decimal("1.00"),
        Decimal("3.00"),
    ]


def test_coalescing_forgets_a_rolled_back_savepoint(outbox, shop):
    payout = Payout.objects.create(shop=shop, amount=Decimal("10.00"), currency="EUR")
    outbox.clear()
    with transaction.atomic():
        with pytest.raises(Boom), transaction.atomic():
            payout.amount = Decimal("11.00")
            payout.save()
            raise Boom
        payout.refresh_from_db()
        payout.currency = "USD"
        payout.save()
    (track,) = outbox.tracks()
    assert track["properties"]["changed_fields"] == ["currency"]
    assert track["properties"]["amount"] == Decimal("10.00")


def test_a_released_savepoint_keeps_coalescing_with_the_outer_block(outbox, shop):
    with transaction.atomic():
        with transaction.atomic():
            payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
        payout.amount = Decimal("2.00")
        payout.save()
    (track,) = outbox.tracks()
    assert track["event"] == "Payout Created"
    assert track["properties"]["amount"] == Decimal("2.00")


def test_a_rolled_back_outer_transaction_leaves_nothing(outbox, shop):
    with pytest.raises(Boom), transaction.atomic():
        with transaction.atomic():
            Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
        shop.xero_connection_ok = False
        shop.save()
        raise Boom
    assert outbox.rows() == []


# --- identify ----------------------------------------------------------------------------------


def test_owner_is_identified_once_per_transaction_with_final_traits(outbox, shop, plan):
    scale = Plan.objects.create(name="Scale", monthly_price=Decimal("99.00"))
    with transaction.atomic():
        shop.plan = scale
        shop.save()
        shop.email = "new@acme.example"
        shop.save()
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    (identify,) = outbox.identifies()
    assert identify["traits"]["plan"] == "Scale"
    assert identify["traits"]["email"] == "new@acme.example"


def test_identify_skipped_when_traits_equal_the_last_recorded(outbox, shop):
    shop.active = False  # tracked property, not a trait
    shop.save()
    assert outbox.events() == ["Shop Updated"]
    assert outbox.identifies() == []


def test_send_unchanged_identify_sends_it_anyway(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND_UNCHANGED_IDENTIFY": True}
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert len(outbox.identifies()) == 1


def test_digest_is_recorded_with_the_identify_and_survives_message_purge(outbox, shop):
    digest = TraitsDigest.objects.get(user_id=str(shop.pk))
    shop.email = "x@acme.example"
    shop.save()
    (row,) = [m for m in outbox.rows() if m.type == "identify"]
    digest.refresh_from_db()
    assert digest.message_id == row.message_id
    Message.objects.all().delete()
    assert TraitsDigest.objects.filter(user_id=str(shop.pk)).exists()


def test_model_with_identify_false_does_not_reidentify(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND_UNCHANGED_IDENTIFY": True}
    ShopSettings.objects.create(shop=shop)
    assert outbox.events() == ["Shop Settings Created"]
    assert outbox.identifies() == []


def test_identity_model_not_in_models_is_still_identified_on_trait_change(outbox, shop, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {"payouts.Payout": {"owner": "shop", "properties": ["amount"]}},
    }
    shop.active = False  # not a trait
    shop.save()
    assert outbox.rows() == []
    shop.email = "changed@acme.example"
    shop.save()
    assert outbox.tracks() == []
    (identify,) = outbox.identifies()
    assert identify["traits"]["email"] == "changed@acme.example"


def test_property_and_method_traits(outbox, plan, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "IDENTITY": {
            "model": "shops.Shop",
            "traits": {"name": "__str__", "plan": "plan__name", "price": "plan__monthly_price"},
        },
    }
    Shop.objects.create(domain="m.example", email="m@m.example", plan=plan)
    (identify,) = outbox.identifies()
    assert identify["traits"] == {"name": "m.example", "plan": "Growth", "price": Decimal("49.00")}


def test_user_id_from_another_field(outbox, plan, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "IDENTITY": {"model": "shops.Shop", "user_id": "domain", "traits": {"email": "email"}},
    }
    shop = Shop.objects.create(domain="u.example", email="u@u.example", plan=plan)
    outbox.clear()
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert outbox.tracks()[0]["userId"] == "u.example"


# --- deletes -----------------------------------------------------------------------------------


def test_delete_tracks_and_reidentifies_the_owner(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND_UNCHANGED_IDENTIFY": True}
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    pk = payout.pk
    outbox.clear()
    payout.delete()
    assert outbox.events() == ["Payout Deleted"]
    assert outbox.tracks()[0]["properties"]["id"] == pk
    assert len(outbox.identifies()) == 1


def test_deleting_the_owner_cascades_deleted_events_and_no_identify(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "SEND_UNCHANGED_IDENTIFY": True}
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    Payout.objects.create(shop=shop, amount=Decimal("2.00"), currency="EUR")
    ShopSettings.objects.create(shop=shop)
    outbox.clear()
    shop_pk = shop.pk
    shop.delete()
    assert sorted(outbox.events()) == [
        "Payout Deleted",
        "Payout Deleted",
        "Shop Deleted",
        "Shop Settings Deleted",
    ]
    assert outbox.identifies() == []
    assert {t["userId"] for t in outbox.tracks()} == {str(shop_pk)}


def test_owner_deleted_in_the_same_transaction_drops_its_pending_identify(outbox, plan):
    with transaction.atomic():
        shop = Shop.objects.create(domain="brief.example", email="b@b.example", plan=plan)
        shop.delete()
    assert outbox.rows() == []
    assert not TraitsDigest.objects.exists()


def test_two_hop_owner_path_resolves_before_the_rows_go(outbox, shop, settings):
    from tests.testapp.models import Customer, Order

    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {"testapp.Order": {"owner": "customer__shop", "properties": ["total"]}},
    }
    customer = Customer.objects.create(shop=shop, name="Ann")
    order = Order.objects.create(
        customer=customer, total=Decimal("5.00"), placed_at=shop.created_at
    )
    customer.delete()
    assert outbox.events() == ["Order Created", "Order Deleted"]
    assert [t["userId"] for t in outbox.tracks()] == [str(shop.pk)] * 2
    assert outbox.tracks()[1]["properties"]["id"] == str(order.pk)


# --- no owner, too large, errors ---------------------------------------------------------------


def test_no_owner_is_stored_failed_with_the_reason(outbox, shop, settings):
    from tests.testapp.models import Customer

    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {"testapp.Customer": {"owner": "shop", "properties": ["name"]}},
    }
    Customer.objects.create(shop=None, name="orphan")
    (row,) = outbox.rows()
    assert row.status == Message.Status.FAILED
    assert row.last_error == "no userId"


def test_too_large_message_is_stored_failed_and_never_pending(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "MAX_MESSAGE_BYTES": 400}
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="E" * 3)
    Shop.objects.filter(pk=shop.pk).update(domain="d" * 200)
    shop.refresh_from_db()
    shop.active = False
    shop.save()
    rows = outbox.rows()
    (created,) = [r for r in rows if r.event == "Payout Created"]
    assert created.status == Message.Status.PENDING
    big = [r for r in rows if r.status == Message.Status.FAILED]
    assert big and big[0].last_error.startswith(f"shops.Shop pk={shop.pk}: too large (")
    assert " > 400 bytes); it begins: {" in big[0].last_error
    # The row keeps an excerpt and the size, not the whole message.
    assert "d" * 200 not in big[0].payload


def test_a_value_that_cannot_be_converted_is_logged_and_the_save_goes_through(
    outbox, shop, settings, caplog
):
    from tests.testapp.models import Customer, Order

    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {"testapp.Order": {"owner": "customer__shop", "properties": ["extra"]}},
    }
    customer = Customer.objects.create(shop=shop, name="Ann")
    order = Order(customer=customer, total=1, placed_at=shop.created_at, extra={"k": 1})
    order.extra = {"bad": object()}  # not even storable as JSON, so never saved to the DB
    with pytest.raises(TypeError):
        order.save()
    caplog.clear()
    order.extra = {"fine": 1}
    order.save()
    assert Order.objects.filter(pk=order.pk).exists()


@pytest.mark.signals_only(
    reason="the hook runs at delivery for trigger-written messages (tests/delivery)"
)
def test_a_failing_enrichment_hook_never_breaks_the_save(outbox, shop, settings, caplog):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "ENRICH_MESSAGE": "tests.core.hooks.broken",
    }
    payout = Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert Payout.objects.filter(pk=payout.pk).exists()
    (track,) = [r for r in outbox.rows() if r.type == "track"]
    assert track.status == Message.Status.FAILED
    assert track.last_error == f"payouts.Payout pk={payout.pk}: RuntimeError: enrichment failed"
    assert f"payouts.Payout pk={payout.pk}" in caplog.text


@pytest.mark.signals_only(
    reason="the hook runs at delivery for trigger-written messages (tests/delivery)"
)
def test_enrichment_hook_adds_context(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "ENRICH_MESSAGE": "tests.core.hooks.add_app"}
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    (track,) = outbox.tracks()
    assert track["context"]["app"] == {"name": "example"}
    assert track["context"]["library"]["name"] == "django-cdp"


# --- switches ----------------------------------------------------------------------------------


def test_tracking_disabled_block_records_nothing(outbox, shop):
    from django_cdp import tracking_disabled

    with tracking_disabled():
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert outbox.rows() == []
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert len(outbox.rows()) == 1


def test_enabled_false_records_nothing(outbox, shop, settings):
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "ENABLED": False}
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert outbox.rows() == []


def test_raw_saves_from_loaddata_are_ignored(outbox, shop, tmp_path):
    from django.core.management import call_command

    fixture = tmp_path / "payouts.json"
    fields = {
        "shop": shop.pk,
        "amount": "3.00",
        "currency": "EUR",
        "status": "paid",
        "created_at": "2026-01-01T00:00:00Z",
    }
    fixture.write_text(json.dumps([{"model": "payouts.payout", "pk": 900, "fields": fields}]))
    call_command("loaddata", str(fixture), verbosity=0)
    assert Payout.objects.filter(pk=900).exists()
    assert outbox.rows() == []


def test_unregistered_models_are_untouched(outbox, plan):
    Plan.objects.create(name="Other", monthly_price=1)
    assert outbox.rows() == []


@pytest.mark.signals_only(reason="sent at delivery for trigger-written messages (tests/delivery)")
def test_message_created_signal(outbox, shop):
    from django_cdp.signals import message_created

    seen = []

    def receiver(sender, message, **kwargs):
        seen.append(message.event)

    message_created.connect(receiver)
    try:
        Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    finally:
        message_created.disconnect(receiver)
    assert seen == ["Payout Created"]


# --- databases ---------------------------------------------------------------------------------


@pytest.mark.django_db(databases=["default", "other"], transaction=True)
def test_messages_are_written_on_the_alias_of_the_change(plan):
    from tests.core.conftest import Outbox

    other_plan = Plan.objects.using("other").create(name="Other", monthly_price=1)
    Shop.objects.using("other").create(domain="o.example", email="o@o.example", plan=other_plan)
    assert Outbox("other").events() == ["Shop Created"]
    assert len(Outbox("other").identifies()) == 1
    assert Outbox("default").rows() == []


def test_a_trait_computed_by_a_method_is_read_after_a_child_change(outbox, plan, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "IDENTITY": {
            "model": "shops.Shop",
            "traits": {"domain": "domain", "payouts": "payout_count"},
        },
    }
    shop = Shop.objects.create(domain="p.example", email="p@p.example", plan=plan)
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    assert [i["traits"]["payouts"] for i in outbox.identifies()] == [0, 1]


def test_traits_changed_behind_the_orm_are_sent_at_the_next_change_of_a_registered_model(
    outbox, shop
):
    Shop.objects.filter(pk=shop.pk).update(email="sync@acme.example")
    Payout.objects.create(shop=shop, amount=Decimal("1.00"), currency="EUR")
    (identify,) = outbox.identifies()
    assert identify["traits"]["email"] == "sync@acme.example"
