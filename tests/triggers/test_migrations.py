"""A migration that renames or drops a tracked column never breaks the user's writes.

Between the migration and the re-install (``migrate`` re-installs at its end; a
deploy may run old code against new triggers or the other way round), the
installed triggers and the table disagree about a column. They read columns
through ``to_jsonb(row)``, so the value is missing (JSON null) until the
triggers match again, and the write goes through.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings

from django_cdp.capture import deferred, triggers
from django_cdp.models import Message
from example_project.shops.models import Plan, Shop
from tests.testapp.models import Gauge
from tests.triggers.conftest import clear

pytestmark = pytest.mark.postgres

GAUGE = {"owner": "shop", "properties": ["level"]}


@pytest.fixture
def gauges(transactional_db, settings):
    models = {**settings.DJANGO_CDP["MODELS"], "testapp.Gauge": GAUGE}
    settings.DJANGO_CDP = {**settings.DJANGO_CDP, "CAPTURE": "triggers", "MODELS": models}
    plan = Plan.objects.create(name="Growth", monthly_price=Decimal("49.00"))
    shop = Shop.objects.create(domain="acme.example", email="o@acme.example", plan=plan)
    clear()
    yield shop
    call_command("migrate", "testapp", verbosity=0)  # back to the latest state


def levels() -> list:
    deferred.expand()  # as delivery does
    return [m.data["properties"]["level"] for m in Message.objects.filter(type="track")]


def test_new_triggers_on_the_old_column_name_let_writes_through(gauges):
    call_command("migrate", "testapp", "0004", verbosity=0)  # the column is "level" again
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO testapp_gauge (shop_id, level) VALUES (%s, 7)", [gauges.pk])
        cursor.execute("UPDATE testapp_gauge SET level = 8")
        cursor.execute("SELECT level FROM testapp_gauge")
        assert cursor.fetchone() == (8,)  # both writes went through
    # The column is missing to the triggers until they match the table: no value, and no
    # change of it to report.
    assert levels() == [None]


def test_old_triggers_on_the_new_column_name_let_writes_through(gauges, settings):
    field = Gauge._meta.get_field("level")
    call_command("migrate", "testapp", "0004", verbosity=0)
    field.column = "level"  # the old code's model: its triggers read "level"
    try:
        triggers.install("default", force=True)
    finally:
        field.column = "level_v2"
    with override_settings(DJANGO_CDP=settings.DJANGO_CDP):  # keep these triggers
        from django.core.signals import setting_changed

        setting_changed.disconnect(triggers._reinstall_on_change)
        try:
            call_command("migrate", "testapp", "0005", verbosity=0)
            statuses = {row.label: row.state for row in triggers.status("default")}
            Gauge.objects.create(shop=gauges, level=5)
        finally:
            setting_changed.connect(triggers._reinstall_on_change)
    assert statuses["testapp.Gauge"] == "current"  # migrate re-installed them at its end
    assert levels() == [5]


def test_a_dropped_tracked_column_lets_writes_through(gauges):
    Gauge.objects.create(shop=gauges, level=1)
    clear()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE testapp_gauge DROP COLUMN level_v2")
            cursor.execute("UPDATE testapp_gauge SET shop_id = shop_id")
            cursor.execute("INSERT INTO testapp_gauge (shop_id) VALUES (%s)", [gauges.pk])
        written = levels()
        transaction.set_rollback(True)  # give the column back
    assert written == [None]  # the insert; the update changed no tracked value
