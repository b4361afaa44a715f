"""The event dictionary: built from the registry and the model fields, rendered and checked."""

from __future__ import annotations

import copy
import json

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from jsonschema import Draft7Validator

from django_cdp import dictionary
from django_cdp.dictionary import check_plan, get_dictionary
from django_cdp.registry import registry

EVENTS = {
    "Customer Charged": {
        "description": "A shop's customer was charged by card.",
        "properties": {
            "amount": {"type": "number", "required": True, "description": "Gross amount."},
            "currency": {"type": "string", "required": True},
            "coupon": {"type": "string", "nullable": True},
            "meta": {"type": "any"},
        },
    }
}


def cdp(**overrides):
    config = copy.deepcopy(settings.DJANGO_CDP)
    config.update(overrides)
    return override_settings(DJANGO_CDP=config)


def with_order(**overrides):
    models = {
        **settings.DJANGO_CDP["MODELS"],
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
                "large": "is_large",
            },
            "events": ["created", "updated"],
        },
    }
    return cdp(MODELS=models, **overrides)


def run(*args: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command("cdp_dictionary", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


# --- building ----------------------------------------------------------------------------------


def test_every_event_of_every_registered_model_with_its_trigger_and_source():
    d = get_dictionary()
    assert {name: (e.trigger, e.source_model) for name, e in d.events.items()} == {
        "Shop Created": ("created", "shops.Shop"),
        "Shop Updated": ("updated", "shops.Shop"),
        "Shop Deleted": ("deleted", "shops.Shop"),
        "Payout Created": ("created", "payouts.Payout"),
        "Payout Updated": ("updated", "payouts.Payout"),
        "Payout Deleted": ("deleted", "payouts.Payout"),
        "Account Mapping Created": ("created", "accounting.Mapping"),
        "Account Mapping Updated": ("updated", "accounting.Mapping"),
        "Account Mapping Deleted": ("deleted", "accounting.Mapping"),
        "Shop Settings Created": ("created", "accounting.ShopSettings"),
        "Shop Settings Updated": ("updated", "accounting.ShopSettings"),
        "Shop Settings Deleted": ("deleted", "accounting.ShopSettings"),
    }


def test_property_types_nullability_and_descriptions_come_from_the_model_fields():
    with with_order():
        event = get_dictionary().events["Order Created"]
        props = {p.name: p for p in event.properties}
        assert {name: p.schema for name, p in props.items()} == {
            "id": {"type": "string", "format": "uuid"},
            "total": {"type": "number"},
            "placed_at": {"type": "string", "format": "date-time"},
            "ship_by": {"type": ["string", "null"], "format": "date"},
            "reference": {"type": "string", "format": "uuid"},
            "channel": {"type": "integer"},
            "extra": {},
            "customer": {"type": "integer"},  # the FK's target pk
            "shop_domain": {"type": ["string", "null"]},  # Order.customer -> Customer.shop is null
            "large": {},  # a method: no type constraint
        }
        assert props["placed_at"].description == "When the customer placed the order."
        assert all(p.required for p in props.values())
        assert "Order Deleted" not in get_dictionary().events


def test_updated_events_require_changed_fields_as_an_array_of_strings():
    event = get_dictionary().events["Payout Updated"]
    (changed,) = [p for p in event.properties if p.name == "changed_fields"]
    assert changed.schema == {"type": "array", "items": {"type": "string"}}
    assert changed.required
    created = get_dictionary().events["Payout Created"]
    assert "changed_fields" not in [p.name for p in created.properties]


def test_identify_traits_with_types_and_nullability_through_a_nullable_foreign_key():
    d = get_dictionary()
    assert d.identity_model == "shops.Shop"
    assert {t.name: t.schema for t in d.traits} == {
        "domain": {"type": "string"},
        "email": {"type": "string"},
        "xero_connection_ok": {"type": "boolean"},
        "plan": {"type": ["string", "null"]},  # Shop.plan is null=True
    }


def test_manual_events_from_settings():
    with cdp(EVENTS=EVENTS):
        event = get_dictionary().events["Customer Charged"]
    assert event.trigger == "manual"
    assert event.source_model == ""
    assert event.description == "A shop's customer was charged by card."
    schema = event.schema()["properties"]["properties"]
    assert schema["required"] == ["amount", "currency"]
    assert schema["properties"]["coupon"] == {"type": ["string", "null"]}
    assert schema["properties"]["meta"] == {}
    assert schema["properties"]["amount"]["description"] == "Gross amount."
    assert schema["additionalProperties"] is False


def test_a_manual_event_may_allow_other_properties():
    events = {"Note Added": {"properties": {}, "additional_properties": True}}
    with cdp(EVENTS=events):
        schema = get_dictionary().events["Note Added"].schema()
    assert "additionalProperties" not in schema["properties"]["properties"]


def test_signed_in_is_planned_when_login_tracks_it():
    assert "Signed In" not in get_dictionary().events
    with cdp(LOGIN={"owner": "member__shop", "track_sign_in": True}):
        event = get_dictionary().events["Signed In"]
    assert (event.trigger, event.source_model, event.properties) == ("login", "shops.Shop", ())


def test_built_once_per_registry_load():
    first = get_dictionary()
    assert get_dictionary() is first
    with cdp(EVENTS=EVENTS):
        assert get_dictionary() is not first
    assert "Customer Charged" not in get_dictionary().events


# --- output ------------------------------------------------------------------------------------


def test_markdown_output():
    with cdp(EVENTS=EVENTS):
        text = run()
    assert text.startswith("# Event dictionary\n")
    assert "Identified model: `shops.Shop`; userId: `id`." in text
    assert "| `plan` | string \\| null | yes | yes | `plan__name` |  |" in text
    assert "| Payout Created | created | `payouts.Payout` |" in text
    assert "| Customer Charged | manual |  |" in text
    assert "### Payout Updated\n\nTrigger: updated · source model: `payouts.Payout`." in text
    assert "| `amount` | number | no | yes | `amount` | Net amount paid out. |" in text
    assert "| `changed_fields` | array of string | no | yes |  |" in text
    assert "| `coupon` | string \\| null | yes | no |  |  |" in text
    assert "A shop's customer was charged by card." in text


def test_json_schema_output_is_one_draft_07_document():
    with cdp(EVENTS=EVENTS):
        document = json.loads(run("--format", "json-schema"))
    assert set(document) == {"identify", "events"}
    assert list(document["events"]) == sorted(document["events"])
    for schema in [document["identify"], *document["events"].values()]:
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
        Draft7Validator.check_schema(schema)
    payout = document["events"]["Payout Created"]
    assert payout["x-django-cdp"] == {"trigger": "created", "source_model": "payouts.Payout"}
    inner = payout["properties"]["properties"]
    assert inner["additionalProperties"] is False
    assert inner["required"] == ["id", "amount", "currency", "status"]
    assert inner["properties"]["currency"] == {
        "type": "string",
        "description": "ISO 4217 currency code.",
    }
    traits = document["identify"]["properties"]["traits"]
    assert traits["required"] == ["domain", "email", "xero_connection_ok", "plan"]
    assert traits["additionalProperties"] is False


def test_output_to_a_file(tmp_path):
    path = tmp_path / "plan.json"
    assert run("--format", "json-schema", "--output", str(path)) == ""
    assert json.loads(path.read_text()) == get_dictionary().to_json_schema()


# --- --check -----------------------------------------------------------------------------------


def test_check_passes_when_the_committed_dictionary_matches(tmp_path):
    for fmt, name in (("json-schema", "plan.json"), ("markdown", "plan.md")):
        path = tmp_path / name
        run("--format", fmt, "--output", str(path))
        assert "matches" in run("--check", str(path))


def test_check_exits_1_on_drift(tmp_path):
    path = tmp_path / "plan.json"
    run("--format", "json-schema", "--output", str(path))
    with cdp(EVENTS=EVENTS):
        with pytest.raises(SystemExit) as exit_info:
            run("--check", str(path))
        assert exit_info.value.code == 1
    with with_order(), pytest.raises(SystemExit) as exit_info:
        run("--check", str(path))
    assert exit_info.value.code == 1


def test_check_output_names_added_removed_and_changed_events(tmp_path):
    from io import StringIO

    path = tmp_path / "plan.json"
    document = get_dictionary().to_json_schema()
    document["events"]["Payout Gone"] = document["events"].pop("Payout Deleted")
    del document["events"]["Payout Created"]["properties"]["properties"]["properties"]["status"]
    path.write_text(json.dumps(document))
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("cdp_dictionary", "--check", str(path), stdout=out, stderr=StringIO())
    text = out.getvalue()
    assert "The event dictionary has drifted from" in text
    assert "event added: Payout Deleted" in text
    assert "event removed: Payout Gone" in text
    assert "event changed: Payout Created (+status)" in text
    assert '-    "Payout Gone": {' in text
    assert '+    "Payout Deleted": {' in text
    assert "manage.py cdp_dictionary --format json-schema --output" in text


def test_markdown_drift_is_a_unified_diff(tmp_path):
    from io import StringIO

    path = tmp_path / "plan.md"
    path.write_text(get_dictionary().to_markdown().replace("Net amount paid out.", "Old text."))
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("cdp_dictionary", "--check", str(path), stdout=out, stderr=StringIO())
    assert "-| `amount` | number | no | yes | `amount` | Old text. |" in out.getvalue()
    assert "+| `amount` | number | no | yes | `amount` | Net amount paid out. |" in out.getvalue()


# --- checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "fragment"),
    [
        ({"": {}}, "empty or non-string event name"),
        ({"Payout Created": {}}, "name of an automatic event"),
        ({"X": []}, "must be a dict"),
        ({"X": {"props": {}}}, "['props'] is not an event option"),
        ({"X": {"properties": []}}, "['properties'] must be a dict"),
        ({"X": {"properties": {"a": {"type": "money"}}}}, "has type 'money'"),
        ({"X": {"properties": {"a": {"type": "string", "required": "yes"}}}}, "'required'"),
        ({"X": {"properties": {"a": {"kind": "string"}}}}, "unknown key 'kind'"),
        ({"X": {"additional_properties": "no"}}, "non-boolean 'additional_properties'"),
    ],
)
def test_a_broken_events_entry_is_e009(events, fragment):
    with cdp(EVENTS=events):
        problems = check_plan()
        assert [p.id for p in problems] == ["django_cdp.E009"]
        assert fragment in problems[0].msg
        assert all(e.trigger != "manual" for e in get_dictionary().events.values())


def test_an_unknown_validation_mode_is_e009_and_wrong_types_are_e001():
    with cdp(VALIDATION="strict"):
        (problem,) = check_plan()
        assert problem.id == "django_cdp.E009"
        assert "'strict'" in problem.msg
    with cdp(EVENTS=[], VALIDATION=1):
        ids = sorted(p.id for p in registry.problems)
        assert ids == ["django_cdp.E001", "django_cdp.E001"]


# Django 6.1's check command asks every database whether it supports JSONField.
@pytest.mark.django_db(databases="__all__")
def test_the_checks_run_with_manage_py_check():
    from django.core.management import CommandError

    with cdp(VALIDATION="strict"), pytest.raises(CommandError, match="E009"):
        call_command("check")


def test_dictionary_module_exposes_the_validation_modes():
    assert dictionary.VALIDATION_MODES == ("flag", "raise", "block", "off")
