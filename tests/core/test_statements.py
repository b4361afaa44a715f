"""The compiled statements give exactly what the ORM gives."""

from __future__ import annotations

import datetime
import uuid
from decimal import Decimal

import pytest

from django_cdp import statements
from django_cdp.models import Message
from tests.testapp.models import Customer, Order

COLUMNS = (
    "total",
    "placed_at",
    "ship_by",
    "reference",
    "channel",
    "extra",
    "customer_id",
    "note",
)


@pytest.fixture
def order(shop):
    customer = Customer.objects.create(shop=shop, name="Ann")
    return Order.objects.create(
        customer=customer,
        total=Decimal("0.10"),
        placed_at=datetime.datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=datetime.timezone.utc),
        ship_by=datetime.date(2026, 3, 5),
        reference=uuid.uuid4(),
        channel=Order.Channel.POS,
        extra={"gift": True, "n": [1, 2]},
        note="ünïcode",
    )


def test_read_columns_matches_values_list(order):
    expected = Order.objects.filter(pk=order.pk).values_list(*COLUMNS).get()
    for _ in range(2):  # compiled on the first call, reused on the second
        assert statements.read_columns(Order, "default", order.pk, COLUMNS) == expected


def test_read_columns_of_a_missing_row_is_none(order):
    assert statements.read_columns(Order, "default", uuid.uuid4(), COLUMNS) is None


def test_read_columns_of_a_subset_is_compiled_separately(order):
    assert statements.read_columns(Order, "default", order.pk, ("note",)) == ("ünïcode",)
    assert statements.read_columns(Order, "default", order.pk, ("channel", "note")) == (
        2,
        "ünïcode",
    )


def test_insert_message_stores_what_save_stores(outbox):
    fields = {
        "message_id": str(uuid.uuid4()),
        "type": "track",
        "event": "Thing Happened",
        "user_id": "42",
        "payload": '{"type":"track"}',
        "status": Message.Status.FAILED,
        "last_error": "no userId",
        "source_model": "testapp.order",
        "source_pk": "7",
        "violations": [{"type": "Unplanned-Event"}],
    }
    row = Message(**fields)
    statements.insert_message(row, "default")
    assert row.pk is not None and not row._state.adding
    stored = Message.objects.get(pk=row.pk)
    for name, value in fields.items():
        assert getattr(stored, name) == value
    assert stored.created_at == row.created_at
    assert stored.next_attempt_at is not None  # the database's clock (db_default=Now())
    assert stored.attempts == 0 and stored.locked_until is None
