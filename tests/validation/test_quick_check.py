"""The quick conformance test never lets a violation through, and spares jsonschema the rest."""

from __future__ import annotations

from decimal import Decimal

import pytest
from jsonschema import Draft7Validator

from django_cdp.validation import _QuickCheck

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "description": "pk"},
        "amount": {"type": ["number", "null"]},
        "name": {"type": "string"},
        "ok": {"type": "boolean"},
        "changed_fields": {"type": "array", "items": {"type": "string"}},
        "when": {"type": "string", "format": "date-time"},
        "anything": {},
    },
    "required": ["id", "name"],
    "additionalProperties": False,
}

VALUES = [
    {"id": 1, "name": "a"},
    {"id": 1, "name": "a", "amount": Decimal("1.50"), "ok": True, "anything": [1, {"x": None}]},
    {"id": 1, "name": "a", "amount": None, "changed_fields": ["amount", "ok"]},
    {"id": 1, "name": "a", "amount": 2.5},
    {"id": True, "name": "a"},  # a bool is not an integer
    {"id": 1.0, "name": "a"},
    {"id": "1", "name": "a"},
    {"id": 1},
    {"id": 1, "name": "a", "extra": 1},
    {"id": 1, "name": "a", "amount": True},
    {"id": 1, "name": "a", "ok": 1},
    {"id": 1, "name": "a", "changed_fields": ["amount", 3]},
    {"id": 1, "name": "a", "changed_fields": "amount"},
    {"id": 1, "name": "a", "when": "2026-01-01T00:00:00Z"},
    {"id": 1, "name": "a", "when": "yesterday"},
    [],
    None,
]


@pytest.mark.parametrize("value", VALUES)
def test_quick_check_never_passes_what_jsonschema_refuses(value):
    validator = Draft7Validator(SCHEMA, format_checker=Draft7Validator.FORMAT_CHECKER)
    if _QuickCheck(SCHEMA).conforms(value):
        assert list(validator.iter_errors(value)) == []


@pytest.mark.parametrize("value", VALUES[:4])
def test_typical_conforming_messages_take_the_quick_path(value):
    assert _QuickCheck(SCHEMA).conforms(value)


def test_a_format_keyword_is_left_to_jsonschema():
    assert not _QuickCheck(SCHEMA).conforms({"id": 1, "name": "a", "when": "2026-01-01"})


def test_a_schema_with_unknown_keywords_is_never_judged_quickly():
    schema = {**SCHEMA, "minProperties": 3}
    assert not _QuickCheck(schema).conforms({"id": 1, "name": "a"})


def test_one_check_remembers_verdicts_per_shape_and_never_lets_a_violation_through():
    """A check that saw every value before any other keeps to jsonschema's verdicts: a
    verdict is remembered per keys and value types, lists are checked item by item."""
    check = _QuickCheck(SCHEMA)
    validator = Draft7Validator(SCHEMA, format_checker=Draft7Validator.FORMAT_CHECKER)
    for value in VALUES * 2:  # the second round answers from what the first remembered
        if check.conforms(value):
            assert list(validator.iter_errors(value)) == []
    assert check.conforms({"id": 1, "name": "a", "changed_fields": ["amount"]})
    assert not check.conforms({"id": 1, "name": "a", "changed_fields": [3]})  # same shape
    assert check.conforms({"id": 2, "name": "b"})  # remembered, for other values too
    assert not check.conforms({"id": "2", "name": "b"})
