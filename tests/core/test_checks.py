"""A misconfigured DJANGO_CDP fails `manage.py check` with its own id, naming the key."""

from __future__ import annotations

import copy

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from tests.settings import DJANGO_CDP as GOOD


def broken(**changes):
    config = copy.deepcopy(GOOD)
    for path, value in changes.items():
        target = config
        keys = path.split("/")
        for key in keys[:-1]:
            target = target[key]
        if value is DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return config


DELETE = object()
PAYOUT = "MODELS/payouts.Payout"


def problems(config) -> list:
    from django_cdp.checks import check_settings

    with override_settings(DJANGO_CDP=config):
        return check_settings()


def test_the_example_configuration_has_no_errors():
    assert problems(GOOD) == []


@pytest.mark.parametrize(
    ("changes", "check_id", "named"),
    [
        ({"SEND_UNCHANGD_IDENTIFY": True}, "E001", "'SEND_UNCHANGD_IDENTIFY'"),
        ({"MAX_MESSAGE_BYTES": "32k"}, "E001", "'MAX_MESSAGE_BYTES'"),
        ({"ENABLED": 1}, "E001", "'ENABLED'"),
        ({"MAX_ATTEMPTS": True}, "E001", "'MAX_ATTEMPTS'"),
        ({"DELIVERY": "kafka"}, "E001", "'DELIVERY'"),
        ({"IDENTITY": DELETE}, "E002", "['IDENTITY']"),
        ({"IDENTITY/model": "shops.Shopp"}, "E002", "['IDENTITY']['model']"),
        ({"IDENTITY/user_id": "uid"}, "E002", "['IDENTITY']['user_id']"),
        ({"MODELS/payouts.Payot": {}}, "E003", "'payouts.Payot'"),
        ({"IDENTITY/traits/plan": "plan__nme"}, "E004", "['traits']['plan']"),
        ({f"{PAYOUT}/properties": ["amount", "amont"]}, "E005", "['properties']['amont']"),
        ({f"{PAYOUT}/properties": {"x": "shop__nope"}}, "E005", "['properties']['x']"),
        ({f"{PAYOUT}/owner": DELETE}, "E006", "['owner']"),
        ({f"{PAYOUT}/owner": "currency"}, "E006", "['owner'] = 'currency'"),
        ({"MODELS/shops.Shop/owner": "plan"}, "E006", "['owner']"),
        ({f"{PAYOUT}/events": ["created", "paid"]}, "E007", "['events']"),
        ({f"{PAYOUT}/event_names": {"sent": "Payout Sent"}}, "E007", "['event_names']"),
        ({f"{PAYOUT}/propertys": ["amount"]}, "E008", "['propertys']"),
        ({f"{PAYOUT}/identify": "yes"}, "E008", "['identify']"),
    ],
)
def test_each_broken_variant_has_its_own_id_and_names_the_key(changes, check_id, named):
    found = problems(broken(**changes))
    assert [p.id for p in found] == [f"django_cdp.{check_id}"], found
    assert named in found[0].msg
    assert found[0].hint


def test_settings_that_are_not_a_dict():
    found = problems("nope")
    assert [p.id for p in found] == ["django_cdp.E001"]


# Django 6.1's check command asks every database whether it supports JSONField.
@pytest.mark.django_db(databases="__all__")
def test_a_broken_dict_does_not_crash_and_check_exits_non_zero():
    config = broken(**{f"{PAYOUT}/owner": "currency"})
    with override_settings(DJANGO_CDP=config), pytest.raises(SystemCheckError, match="E006"):
        call_command("check")


def test_a_broken_model_entry_is_left_out_while_the_rest_keeps_working(outbox, shop):
    from decimal import Decimal

    from example_project.payouts.models import Payout

    with override_settings(DJANGO_CDP=broken(**{f"{PAYOUT}/owner": "currency"})):
        Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
        shop.active = False
        shop.save()
    assert outbox.events() == ["Shop Updated"]


# Django 6.1's check command asks every database whether it supports JSONField.
@pytest.mark.django_db(databases="__all__")
def test_check_passes_with_the_good_configuration():
    call_command("check", fail_level="ERROR")


def test_w001_warns_when_there_is_nowhere_to_send():
    from django_cdp.checks import check_delivery

    with override_settings(DJANGO_CDP={**GOOD, "WRITE_KEY": "k", "DATA_PLANE_URL": ""}):
        ids = [m.id for m in check_delivery()]
    assert "django_cdp.W001" in ids
    with override_settings(
        DJANGO_CDP={**GOOD, "WRITE_KEY": "k", "DATA_PLANE_URL": "http://127.0.0.1:1"}
    ):
        assert "django_cdp.W001" not in [m.id for m in check_delivery()]
