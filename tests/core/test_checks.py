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
        ({f"{PAYOUT}/properties": ["amount", "amont"]}, "E005", "['properties'][1] = 'amont'"),
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


# --- what the messages say: why, and the name that was meant ----------------------------------

WORKSPACE = "MODELS/testapp.WorkspaceProject"


@pytest.mark.parametrize(
    ("changes", "check_id", "says"),
    [
        (
            {"SEND_UNCHANGD_IDENTIFY": True},
            "E001",
            ["['SEND_UNCHANGD_IDENTIFY']", "Did you mean 'SEND_UNCHANGED_IDENTIFY'?"],
        ),
        ({"IDENTITY/trait": {}}, "E002", ["['IDENTITY']['trait']", "Did you mean 'traits'?"]),
        (
            {"IDENTITY/model": "shops.Shopp"},
            "E002",
            ["['IDENTITY']['model'] = 'shops.Shopp'", "Did you mean 'shops.Shop'?"],
        ),
        (
            {"IDENTITY/user_id": "domian"},
            "E002",
            ["['IDENTITY']['user_id'] = 'domian'", "Did you mean 'domain'?"],
        ),
        (
            {"MODELS/payouts.Payot": {}},
            "E003",
            ["['payouts.Payot']", "Did you mean 'payouts.Payout'?"],
        ),
        (
            {"IDENTITY/traits/plan": "plan__nme"},
            "E004",
            ["['traits']['plan'] = 'plan__nme'", "'nme' is not a field of shops.Plan.", "'name'?"],
        ),
        (
            {"IDENTITY/traits/payouts": "payout_cont"},
            "E004",
            ["['traits']['payouts'] = 'payout_cont'", "Did you mean 'payout_count'?"],
        ),
        (
            {f"{PAYOUT}/properties": ["amount", "bogus"]},
            "E005",
            ["['payouts.Payout']['properties'][1] = 'bogus'", "not a field of payouts.Payout"],
        ),
        (
            {f"{PAYOUT}/properties": {"x": "shop__nope"}},
            "E005",
            ["['properties']['x'] = 'shop__nope'", "'nope' is not a field of shops.Shop."],
        ),
        (
            {WORKSPACE: {"owner": "shop", "properties": {"name": "title__name"}}},
            "E005",
            [
                "['properties']['name'] = 'title__name'",
                "'title' is a CharField of testapp.WorkspaceProject, not a foreign key",
            ],
        ),
        (
            {WORKSPACE: {"owner": "shop", "properties": ["members"]}},
            "E005",
            ["['properties'][0] = 'members'", "'members' is not a field"],
        ),
        (
            {f"{PAYOUT}/owner": "currency"},
            "E006",
            ["['owner'] = 'currency'", "'currency' is a CharField of payouts.Payout"],
        ),
        ({f"{PAYOUT}/owner": DELETE}, "E006", ["['owner'] is missing"]),
        ({f"{PAYOUT}/propertys": ["amount"]}, "E008", ["['propertys']", "'properties'?"]),
    ],
)
def test_the_message_says_why_and_suggests_the_name_that_was_meant(changes, check_id, says):
    found = problems(broken(**changes))
    assert [p.id for p in found] == [f"django_cdp.{check_id}"], found
    for text in says:
        assert text in found[0].msg, found[0].msg


def test_the_owner_hint_names_the_foreign_key_that_leads_to_the_identity_model():
    (found,) = problems(broken(**{f"{PAYOUT}/owner": "currency"}))
    assert "here 'shop'" in found.hint


def test_a_path_that_failed_is_never_suggested_back():
    # 'title' is a field, so a suggestion among field names would offer the failing value.
    config = broken(**{WORKSPACE: {"owner": "shop", "properties": {"title": "title__name"}}})
    (found,) = problems(config)
    assert "Did you mean" not in found.msg
    assert "title__name" not in found.hint
    (found,) = problems(broken(**{f"{PAYOUT}/owner": "shop__plan"}))
    assert "it leads to shops.Plan" in found.msg
    assert "'shop__plan'" not in found.hint


def test_hints_link_to_the_docs_page():
    (found,) = problems(broken(**{f"{PAYOUT}/owner": "currency"}))
    assert found.hint.endswith("See django-cdp/docs/tracking.md#configuration-errors.")
    (found,) = problems(broken(**{"MAX_MESSAGE_BYTES": "32k"}))
    assert found.hint.endswith("See django-cdp/README.md#the-django_cdp-settings-dict.")


# --- the settings table -----------------------------------------------------------------------


def test_every_setting_has_a_default_of_its_type_and_a_doc():
    from django_cdp.registry import _type_ok
    from django_cdp.settings import SETTINGS

    for name, setting in SETTINGS.items():
        # IDENTITY has no usable default: leaving it out is check E002.
        assert setting.default is None or _type_ok(setting.default, setting.types), name
        assert setting.doc.strip(), name


def test_the_readme_documents_every_setting():
    from pathlib import Path

    from django_cdp.settings import SETTINGS

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert [name for name in SETTINGS if f"`{name}`" not in readme] == []


def test_a_wrong_type_is_reported_with_the_meaning_and_default_from_the_table():
    from django_cdp.settings import SETTINGS

    (found,) = problems(broken(MAX_MESSAGE_BYTES="32k"))
    assert found.msg == "DJANGO_CDP['MAX_MESSAGE_BYTES'] must be int, not str."
    assert SETTINGS["MAX_MESSAGE_BYTES"].doc in found.hint
    assert "Default: 32768." in found.hint


def test_enrich_message_reads_as_the_imported_function():
    from django_cdp.settings import cdp_settings
    from tests.core import hooks

    with override_settings(DJANGO_CDP={**GOOD, "ENRICH_MESSAGE": "tests.core.hooks.add_app"}):
        assert cdp_settings.ENRICH_MESSAGE is hooks.add_app
    assert cdp_settings.ENRICH_MESSAGE is None


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("tests.core.hooks.add_ap", "cannot be imported: ImportError: Module"),
        ("tests.core.no_such_module.enrich", "cannot be imported: ModuleNotFoundError"),
        ("tests.core.hooks.__doc__", "is a str, not a function"),
    ],
)
def test_an_enrich_path_that_does_not_import_is_a_check_error_naming_key_and_path(path, reason):
    (found,) = problems(broken(ENRICH_MESSAGE=path))
    assert found.id == "django_cdp.E001"
    assert found.msg.startswith(f"DJANGO_CDP['ENRICH_MESSAGE'] = {path!r} ")
    assert reason in found.msg


def test_a_save_with_a_broken_enrich_path_stores_a_failed_row_naming_key_and_path(
    outbox, shop, caplog
):
    from decimal import Decimal

    from example_project.payouts.models import Payout

    with override_settings(DJANGO_CDP={**GOOD, "ENRICH_MESSAGE": "tests.core.hooks.nope"}):
        payout = Payout.objects.create(shop=shop, amount=Decimal("1"), currency="EUR")
    assert Payout.objects.filter(pk=payout.pk).exists()
    (row,) = outbox.rows()
    assert row.status == "failed"
    assert "DJANGO_CDP['ENRICH_MESSAGE'] = 'tests.core.hooks.nope' cannot be imported" in (
        row.last_error
    )
    assert "DJANGO_CDP['ENRICH_MESSAGE'] = 'tests.core.hooks.nope' cannot be imported" in (
        caplog.text
    )


# --- W002: Celery delivery without a broker ---------------------------------------------------


@pytest.fixture
def celery_app(monkeypatch):
    """Make a fresh Celery app current (no broker unless given), restoring the previous one."""
    from celery import Celery, _state

    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL", raising=False)
    previous = _state.get_current_app()

    def make(**conf):
        app = Celery("w002", set_as_current=False)
        app.conf.update(conf)
        app.set_current()
        return app

    yield make
    previous.set_current()


def w002(**cdp) -> bool:
    from django_cdp.checks import check_delivery

    with override_settings(DJANGO_CDP={**GOOD, **cdp}):
        return "django_cdp.W002" in [m.id for m in check_delivery()]


def test_w002_warns_when_celery_delivery_has_no_broker(celery_app):
    from django_cdp.checks import check_delivery

    celery_app()
    with override_settings(DJANGO_CDP={**GOOD, "DELIVERY": "celery"}):
        (found,) = [m for m in check_delivery() if m.id == "django_cdp.W002"]
    assert "['DELIVERY'] is 'celery' but no Celery broker is configured" in found.msg
    assert "CELERY_BROKER_URL" in found.hint
    assert "'manual'" in found.hint and "cdp_deliver" in found.hint
    assert not w002(DELIVERY="manual")


@pytest.mark.parametrize(
    "configure",
    [
        pytest.param(lambda app, settings, env: app(broker_url="redis://127.0.0.1:9/0"), id="app"),
        pytest.param(
            lambda app, settings, env: app(broker_write_url="redis://127.0.0.1:9/0"), id="write"
        ),
        pytest.param(lambda app, settings, env: app(task_always_eager=True), id="eager"),
        pytest.param(
            lambda app, settings, env: env.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:9/0"),
            id="environment",
        ),
        pytest.param(
            lambda app, settings, env: setattr(settings, "CELERY_BROKER_URL", "memory://"),
            id="django-settings",
        ),
        pytest.param(
            lambda app, settings, env: setattr(settings, "BROKER_URL", "memory://"),
            id="old-django-setting",
        ),
    ],
)
def test_no_w002_when_a_broker_is_configured_anywhere_celery_reads_it(
    configure, celery_app, settings, monkeypatch
):
    celery_app()
    configure(celery_app, settings, monkeypatch)
    # Port 9 answers nothing: a check that connected would fail or hang here.
    assert not w002(DELIVERY="celery")


# --- I001: only for the databases that hold the outbox, only where databases are checked -------


def test_i001_is_not_shown_by_commands_that_check_no_database():
    from django.core.checks import run_checks

    from django_cdp.checks import check_outbox_databases

    assert check_outbox_databases() == []
    assert "django_cdp.I001" not in [m.id for m in run_checks()]


def test_i001_once_for_each_given_database_that_cannot_skip_locked():
    from django.db import connections

    from django_cdp.checks import check_outbox_databases

    found = check_outbox_databases(databases=["default", "other"])
    expected = [
        alias
        for alias in ("default", "other")
        if not connections[alias].features.has_select_for_update_skip_locked
    ]
    assert [m.id for m in found] == ["django_cdp.I001"] * len(expected)
    assert [m.msg.split("'")[1] for m in found] == expected
    assert "other" in expected  # the second alias is SQLite on both test databases


class OutboxOnDefaultOnly:
    def allow_migrate(self, db, app_label, **hints):
        return db == "default" if app_label == "django_cdp" else None


def test_i001_skips_a_database_the_router_keeps_the_outbox_off():
    from django_cdp.checks import check_outbox_databases

    with override_settings(DATABASE_ROUTERS=[OutboxOnDefaultOnly()]):
        assert check_outbox_databases(databases=["other"]) == []


# Django 6.1's check command asks every database whether it supports JSONField.
@pytest.mark.django_db(databases="__all__")
def test_check_database_shows_i001_once():
    from io import StringIO

    def output(**options) -> str:
        out, err = StringIO(), StringIO()
        call_command("check", stdout=out, stderr=err, **options)
        return out.getvalue() + err.getvalue()

    assert output(databases=["other"]).count("django_cdp.I001") == 1
    assert "django_cdp.I001" not in output()
