"""Fixtures for the backfill tests: shops that exist before django-cdp was installed."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.core.management import call_command

from django_cdp.models import Message
from django_cdp.scope import tracking_disabled
from example_project.shops.models import Plan, Shop


class Run:
    """The output of one ``cdp_backfill_identify`` run."""

    def __init__(self, stdout: str, stderr: str) -> None:
        self.stdout = stdout
        self.stderr = stderr


@pytest.fixture
def backfill(transactional_db) -> Callable[..., Run]:
    """Run ``manage.py cdp_backfill_identify`` with arguments; returns its output."""

    def run(*args: str, stdout: io.StringIO | None = None) -> Run:
        out, err = stdout or io.StringIO(), io.StringIO()
        call_command("cdp_backfill_identify", *args, stdout=out, stderr=err)
        return Run(out.getvalue(), err.getvalue())

    return run


@pytest.fixture
def plans(transactional_db) -> dict[str, Plan]:
    with tracking_disabled():
        return {
            name: Plan.objects.create(name=name, monthly_price=Decimal(price))
            for name, price in (("Growth", "49.00"), ("Scale", "199.00"))
        }


@pytest.fixture
def legacy_shops(plans) -> Callable[..., list[Shop]]:
    """Create shops with tracking off (as if they predate django-cdp): no messages, no digest."""

    def make(n: int, *, plan: str = "Growth", start: int = 0, using: str = "default") -> list:
        with tracking_disabled():
            plan_obj = Plan.objects.using(using).get_or_create(
                name=plan, defaults={"monthly_price": Decimal("49.00")}
            )[0]
            return Shop.objects.using(using).bulk_create(
                [
                    Shop(domain=f"shop{i}.example", email=f"owner@shop{i}.example", plan=plan_obj)
                    for i in range(start, start + n)
                ]
            )

    return make


def identifies(using: str = "default") -> list[dict]:
    return [
        json.loads(m.payload, parse_float=Decimal)
        for m in Message.objects.using(using).filter(type="identify").order_by("id")
    ]


def tracks(using: str = "default") -> list[dict]:
    return [
        json.loads(m.payload, parse_float=Decimal)
        for m in Message.objects.using(using).filter(type="track").order_by("id")
    ]
