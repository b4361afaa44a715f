"""Values are converted to JSON the same way everywhere, and never silently dropped."""

from __future__ import annotations

import datetime
import enum
import json
import uuid
from decimal import Decimal

import pytest
from django.utils.translation import gettext_lazy

from django_cdp.payloads import PayloadError, encode, json_value, traits_digest
from tests.testapp.models import Customer, Order

UTC = datetime.timezone.utc


class Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (True, True),
        (3, 3),
        (1.5, 1.5),
        ("text", "text"),
        (Decimal("10.10"), Decimal("10.10")),
        (datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z"),
        (
            datetime.datetime(
                2026, 1, 2, 4, 4, 5, 120000, tzinfo=datetime.timezone(datetime.timedelta(hours=1))
            ),
            "2026-01-02T03:04:05.120000Z",
        ),
        (datetime.date(2026, 1, 2), "2026-01-02"),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (Color.RED, "red"),
        (gettext_lazy("lazy"), "lazy"),
        (datetime.timedelta(minutes=2), 120.0),
        ({"a": [1, (2, 3)]}, {"a": [1, [2, 3]]}),
        ({3, 1, 2}, [1, 2, 3]),
    ],
)
def test_json_value_conversions(value, expected):
    assert json_value(value, "f") == expected


def test_naive_datetime_is_taken_in_the_current_time_zone(settings):
    # tests.settings: TIME_ZONE = Europe/Berlin (UTC+1 in January)
    assert json_value(datetime.datetime(2026, 1, 2, 12, 0), "f") == "2026-01-02T11:00:00Z"


@pytest.mark.parametrize("value", [object(), b"bytes", float("nan"), Decimal("Infinity")])
def test_unconvertible_values_raise_naming_the_field(value):
    with pytest.raises(PayloadError, match=r"^the_field: "):
        json_value(value, "the_field")


def test_decimals_are_encoded_as_exact_json_numbers():
    text = encode({"a": Decimal("0.10"), "b": [Decimal("-1E+3")], "c": "0.10"})
    assert text == '{"a":0.10,"b":[-1E+3],"c":"0.10"}'
    assert json.loads(text, parse_float=Decimal) == {
        "a": Decimal("0.10"),
        "b": [Decimal("-1E+3")],
        "c": "0.10",
    }


def test_encoding_keeps_non_ascii_text_and_escapes_nothing_else():
    assert encode({"name": "Café ☕"}) == '{"name":"Café ☕"}'


def test_digest_ignores_key_order_but_not_values():
    assert traits_digest({"a": 1, "b": 2}) == traits_digest({"b": 2, "a": 1})
    assert traits_digest({"a": 1}) != traits_digest({"a": 2})


def test_every_field_type_of_a_real_row(outbox, shop, settings):
    settings.DJANGO_CDP = {
        **settings.DJANGO_CDP,
        "MODELS": {
            "testapp.Order": {
                "owner": "customer__shop",
                "properties": {
                    "total": "total",
                    "placed_at": "placed_at",
                    "ship_by": "ship_by",
                    "reference": "reference",
                    "channel": "channel",
                    "extra": "extra",
                    "customer": "customer",
                    "shop_domain": "customer__shop__domain",
                    "with_tax": "total_with_tax",
                    "large": "is_large",
                },
            }
        },
    }
    customer = Customer.objects.create(shop=shop, name="Ann")
    ref = uuid.uuid4()
    order = Order.objects.create(
        customer=customer,
        total=Decimal("600.00"),
        placed_at=datetime.datetime(2026, 3, 1, 9, 30, tzinfo=UTC),
        ship_by=datetime.date(2026, 3, 5),
        reference=ref,
        channel=Order.Channel.POS,
        extra={"gift": True},
    )
    (track,) = outbox.tracks()
    assert track["properties"] == {
        "id": str(order.pk),
        "total": Decimal("600.00"),
        "placed_at": "2026-03-01T09:30:00Z",
        "ship_by": "2026-03-05",
        "reference": str(ref),
        "channel": 2,
        "extra": {"gift": True},
        "customer": customer.pk,
        "shop_domain": "acme.example",
        "with_tax": Decimal("1200.00"),
        "large": False,
    }
