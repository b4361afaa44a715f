"""Every failure point times every write path: the user's write always survives.

For each cell the user's row is committed, a query after the failure works (in
the same transaction, where there is one), and the message that could not be
built is stored as ``failed`` with a reason that names the model and primary
key, never sent. Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connections, transaction
from django.test import Client

import django_cdp
from django_cdp.models import Message
from django_cdp.scope import tracking_disabled
from example_project.shops.models import Shop
from tests.testapp.models import Reading
from tests.trust.conftest import FAILURES, Failure, failed_rows

# --- change paths: the user's code writes a Reading -------------------------------------------


def _update_values(failure: Failure) -> dict:
    """An update that changes a tracked property, with the failure point's values."""
    return {"score": 2.5, **failure.values}


def _clean_reading(shop: Shop, **values) -> Reading:
    with tracking_disabled():
        return Reading.objects.create(shop=shop, **values)


def create_autocommit(failure, shop):
    return Reading.objects.create(shop=shop, **failure.values)


def create_atomic(failure, shop):
    with transaction.atomic():
        reading = Reading.objects.create(shop=shop, **failure.values)
        assert Shop.objects.filter(pk=shop.pk).exists()  # the transaction still works
    return reading


def _changed_reading(failure, shop) -> tuple[Reading, dict]:
    """A reading saved cleanly, then changed in memory with the failure point's values."""
    reading = _clean_reading(shop)
    values = _update_values(failure)
    for name, value in values.items():
        setattr(reading, name, value)
    return reading, values


def update_atomic(failure, shop):
    reading, _ = _changed_reading(failure, shop)
    with transaction.atomic():
        reading.save()
        assert Shop.objects.filter(pk=shop.pk).exists()
    return reading


def update_autocommit(failure, shop):
    reading, _ = _changed_reading(failure, shop)
    reading.save()
    return reading


def update_fields(failure, shop):
    reading, values = _changed_reading(failure, shop)
    with transaction.atomic():
        reading.save(update_fields=list(values))
        assert Shop.objects.filter(pk=shop.pk).exists()
    return reading


def nested_savepoint(failure, shop):
    with transaction.atomic():
        with transaction.atomic():
            reading = Reading.objects.create(shop=shop, **failure.values)
        assert Shop.objects.filter(pk=shop.pk).exists()
    return reading


def delete(failure, shop):
    reading = _clean_reading(shop, **failure.values)
    with transaction.atomic():
        reading.delete()
        assert Shop.objects.filter(pk=shop.pk).exists()
    return None


def delete_autocommit(failure, shop):
    _clean_reading(shop, **failure.values).delete()
    return None


def cascade(failure, shop):
    _clean_reading(shop, **failure.values)
    with transaction.atomic():
        shop.delete()  # takes its readings with it
        assert not Shop.objects.filter(pk=shop.pk).exists()
    return None


def view_atomic_requests(failure, shop):
    connection = connections["default"]
    connection.settings_dict["ATOMIC_REQUESTS"] = True
    try:
        values = {"shop_id": shop.pk, **failure.values}
        response = Client().post(
            "/trust/readings/", json.dumps(values), content_type="application/json"
        )
    finally:
        connection.settings_dict["ATOMIC_REQUESTS"] = False
    assert response.status_code == 200, response.content
    assert response.json()["shops"] == 1
    return Reading.objects.get(pk=response.json()["pk"])


def bulk_create(failure, shop):
    with transaction.atomic():
        (reading,) = django_cdp.bulk_create([Reading(shop=shop, **failure.values)])
        assert Shop.objects.filter(pk=shop.pk).exists()
    return reading


def bulk_update(failure, shop):
    reading, values = _changed_reading(failure, shop)
    django_cdp.bulk_update([reading], list(values))
    return reading


def queryset_update(failure, shop):
    reading = _clean_reading(shop)
    django_cdp.queryset_update(Reading.objects.filter(pk=reading.pk), **_update_values(failure))
    return Reading.objects.get(pk=reading.pk)


UPDATE_PATHS = {update_atomic, update_autocommit, update_fields, bulk_update, queryset_update}
CHANGE_PATHS = [
    create_autocommit,
    create_atomic,
    update_atomic,
    update_autocommit,
    update_fields,
    nested_savepoint,
    delete,
    delete_autocommit,
    cascade,
    view_atomic_requests,
    bulk_create,
    bulk_update,
    queryset_update,
]


def _cells():
    for path in CHANGE_PATHS:
        for name in FAILURES:
            if path is view_atomic_requests and name == "binary":
                continue  # bytes cannot be posted as JSON; the other paths cover the field
            yield pytest.param(path, name, id=f"{name}-{path.__name__}")


@pytest.mark.parametrize(("path", "failure"), list(_cells()), indirect=["failure"])
def test_a_change_always_commits_and_its_message_is_stored_failed(path, failure):
    shop = failure.shop
    reading = path(failure, shop)

    if reading is None:  # a delete: the row is gone, as the user asked
        assert not Reading.objects.exists()
    else:
        stored = Reading.objects.get(pk=reading.pk)
        written = _update_values(failure) if path in UPDATE_PATHS else failure.values
        for name, value in written.items():
            held = getattr(stored, name)
            assert (bytes(held) if name == "blob" else held) == value
        assert stored.shop_id == shop.pk
    rows = failed_rows(failure.reason)
    assert rows, f"no failed row with {failure.reason!r}: " + repr(
        list(Message.objects.values_list("status", "last_error"))
    )
    for row in rows:
        assert row.last_error.startswith(f"{_label(row)} pk="), row.last_error
        assert row.attempts == 0 and row.sent_at is None
    assert Message.objects.exclude(status__in=["pending", "failed"]).count() == 0


def _label(row: Message) -> str:
    return apps.get_model(row.source_model)._meta.label


# --- explicit calls and the backfill --------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [n for n in FAILURES if n not in ("binary", "unconvertible", "raising property")],
    indirect=True,
)
def test_track_stores_a_failed_row_and_leaves_the_transaction_working(failure):
    shop = failure.shop
    with transaction.atomic():
        reading = Reading.objects.create(shop=shop)
        row = django_cdp.track(reading, "Reading Checked", {"note": "x" * 200})
        assert Shop.objects.filter(pk=shop.pk).exists()
    assert Reading.objects.filter(pk=reading.pk).exists()
    assert row.status == Message.Status.FAILED
    assert failure.reason in Message.objects.get(pk=row.pk).last_error


@pytest.mark.parametrize("failure", ["unconvertible"], indirect=True)
def test_track_raises_a_clear_error_for_its_own_bad_property_before_any_sql(failure):
    from django_cdp.payloads import PayloadError

    shop = failure.shop
    with transaction.atomic():
        reading = Reading.objects.create(shop=shop)
        with pytest.raises(PayloadError, match=r"^score: inf is not a JSON number$"):
            django_cdp.track(reading, "Reading Checked", {"score": float("inf")})
        assert Shop.objects.filter(pk=shop.pk).exists()  # the caller's transaction works
    assert Reading.objects.filter(pk=reading.pk).exists()


@pytest.mark.parametrize("failure", list(FAILURES), indirect=True)
def test_identify_stores_a_failed_row_and_leaves_the_transaction_working(failure):
    shop = failure.shop
    with transaction.atomic():
        Shop.objects.filter(pk=shop.pk).update(email="new@acme.example")
        django_cdp.identify(shop, force=True)
        assert Shop.objects.filter(email="new@acme.example").exists()
    assert Shop.objects.get(pk=shop.pk).email == "new@acme.example"
    if failure.name in ("binary", "unconvertible", "raising property"):
        (row,) = failed_rows("health: ")
        assert row.last_error.startswith(f"shops.Shop pk={shop.pk}: health: ")
    assert failed_rows(failure.reason)


@pytest.mark.parametrize("failure", list(FAILURES), indirect=True)
def test_backfill_stores_a_failed_row_per_shop_and_runs_to_the_end(failure):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):  # non-zero exit: some identifies cannot be sent
        call_command("cdp_backfill_identify", "--force", stdout=_Sink(), stderr=_Sink())
    assert failed_rows(failure.reason)
    assert Shop.objects.count() == 1


class _Sink:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
