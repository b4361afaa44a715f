"""``django_cdp.context()``: fields added to the messages written in its block, on both engines."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest
from django.db import transaction

import django_cdp
from example_project.payouts.models import Payout

LIBRARY = {"name": "django-cdp", "version": django_cdp.__version__}


def pay(shop, amount: str = "10.00") -> Payout:
    return Payout.objects.create(shop=shop, amount=Decimal(amount), currency="EUR")


def test_tracks_and_identifies_written_in_the_block_carry_its_fields(shop, outbox, engine):
    with django_cdp.context(source="nightly-import", job={"id": 7}):
        pay(shop)
        shop.email = "billing@acme.example"
        shop.save()
    track, identify = outbox.all()
    assert track["event"] == "Payout Created"
    assert track["context"] == {"source": "nightly-import", "job": {"id": 7}, "library": LIBRARY}
    assert identify["type"] == "identify"
    assert identify["context"]["source"] == "nightly-import"
    assert identify["context"]["traits"]["email"] == "billing@acme.example"
    assert identify["context"]["library"] == LIBRARY
    assert "anonymousId" not in track and "anonymousId" not in identify


def test_messages_outside_a_block_carry_no_context(shop, outbox, engine):
    with django_cdp.context(source="import"):
        pass
    pay(shop)
    [track] = outbox.all()
    assert track["context"] == {"library": LIBRARY}


def test_blocks_nest_inner_wins_and_the_outer_is_back_on_exit(shop, outbox, engine):
    with django_cdp.context(source="import", page={"path": "/a", "title": "A"}):
        with django_cdp.context(source="retry", page={"path": "/b"}):
            pay(shop, "1.00")
        pay(shop, "2.00")
    pay(shop, "3.00")
    inner, outer, none = outbox.all()
    assert inner["context"]["source"] == "retry"
    assert inner["context"]["page"] == {"path": "/b", "title": "A"}
    assert outer["context"]["source"] == "import"
    assert outer["context"]["page"] == {"path": "/a", "title": "A"}
    assert none["context"] == {"library": LIBRARY}


def test_each_statement_of_a_transaction_gets_the_context_of_its_moment(shop, outbox, engine):
    with transaction.atomic():
        with django_cdp.context(step="one"):
            pay(shop, "1.00")
        with django_cdp.context(step="two"):
            pay(shop, "2.00")
        pay(shop, "3.00")
    steps = [m["context"].get("step") for m in outbox.all()]
    assert steps == ["one", "two", None]


def test_the_context_does_not_outlive_its_transaction_on_the_connection(shop, outbox, engine):
    with django_cdp.context(step="one"), transaction.atomic():
        pay(shop, "1.00")
    pay(shop, "2.00")  # same connection, autocommit: a later request's write
    with transaction.atomic():
        pay(shop, "3.00")
    assert [m["context"].get("step") for m in outbox.all()] == ["one", None, None]


def test_library_stays_django_cdps_own(shop, outbox, engine):
    with django_cdp.context(library={"name": "mine"}):
        pay(shop)
    assert outbox.all()[0]["context"]["library"] == LIBRARY


def test_values_are_converted_to_json(shop, outbox, engine):
    moment = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    with django_cdp.context(at=moment, amount=Decimal("1.50")):
        pay(shop)
    context = outbox.all()[0]["context"]
    assert context["at"] == "2025-01-02T03:04:05Z"
    assert context["amount"] == "1.50"


def test_a_value_without_json_form_raises_naming_it_before_any_write(db):
    with pytest.raises(TypeError, match="blob="), django_cdp.context(blob=object()):
        pass
