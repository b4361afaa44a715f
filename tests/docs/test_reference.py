"""docs/reference.md lists everything a user configures or calls, as the code defines it.

A settings key, a check id, a management command or one of its options, or a signal that
the code has and the reference page lacks fails here, as does a default or type in the
settings table that differs from ``SETTINGS``: the reference cannot drift from the code.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from django.core.management import BaseCommand, get_commands, load_command_class
from django.dispatch import Signal

import django_cdp
from django_cdp import signals
from django_cdp.dictionary import EVENT_KEYS, PROPERTY_KEYS
from django_cdp.frontend import FRONTEND_KEYS
from django_cdp.login import LOGIN_KEYS
from django_cdp.middleware import DEFAULTS as REQUEST_CONTEXT_DEFAULTS
from django_cdp.registry import IDENTITY_KEYS, MODEL_KEYS
from django_cdp.settings import SETTINGS

REPO = Path(__file__).resolve().parents[2]
PAGE = (REPO / "docs" / "reference.md").read_text()
PACKAGE = Path(django_cdp.__file__).parent


def section(title: str) -> str:
    """The text of the section headed ``title`` (any level), up to the next heading."""
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^#+ |\Z)", PAGE, re.M | re.S)
    assert match, f"docs/reference.md has no section {title!r}"
    return match.group(2)


def first_column(text: str) -> set[str]:
    """The code spans in the first column of the Markdown tables in ``text``."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.M))


def shown(value: object) -> str:
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def type_names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def test_every_settings_key_is_listed_with_its_default_and_type():
    rows = {
        m.group(1): (m.group(2), m.group(3))
        for m in re.finditer(
            r"^\| `([A-Z_]+)` \| (`[^|]*`) \| ([^|]+) \|", section("Settings"), re.M
        )
    }
    assert sorted(rows) == sorted(SETTINGS)
    for key, setting in SETTINGS.items():
        assert rows[key] == (shown(setting.default), type_names(setting.types)), key


@pytest.mark.parametrize(
    ("title", "keys"),
    [
        ("`IDENTITY`", IDENTITY_KEYS),
        ("`MODELS` (per model)", MODEL_KEYS),
        ("`LOGIN`", LOGIN_KEYS),
        ("`FRONTEND`", FRONTEND_KEYS),
        ("`REQUEST_CONTEXT`", REQUEST_CONTEXT_DEFAULTS),
        ("`EVENTS` (per event, and per property)", EVENT_KEYS | PROPERTY_KEYS),
    ],
)
def test_every_nested_settings_key_is_listed(title, keys):
    assert first_column(section(title)) == set(keys)


def test_request_context_defaults_match_the_code():
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (`[^|]*`) \|", section("`REQUEST_CONTEXT`"), re.M))
    assert rows == {key: shown(value) for key, value in REQUEST_CONTEXT_DEFAULTS.items()}


def test_the_middleware_and_context_managers_are_listed_and_import():
    names = {name.split("(")[0] for name in first_column(section("Middleware and context"))}
    assert names == {
        "django_cdp.middleware.RequestContextMiddleware",
        "django_cdp.context",
        "django_cdp.tracking_disabled",
    }
    for name in names:
        module, _, attribute = name.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attribute)), name


def test_every_check_id_is_listed():
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    # "django_cdp.W001" in a checks.Warning, or "E004" handed to the registry's _error()
    ids = set(re.findall(r"[\"'.]([EWI]\d{3})[\"']", source))
    assert len(ids) >= 18  # the scan itself still finds them
    assert first_column(section("System checks")) == {f"django_cdp.{i}" for i in ids}


def _options(name: str) -> set[str]:
    """The long options and positional arguments ``name`` adds to Django's own."""
    common = {
        s for a in BaseCommand().create_parser("manage.py", "x")._actions for s in a.option_strings
    }
    parser = load_command_class("django_cdp", name).create_parser("manage.py", name)
    out = set()
    for action in parser._actions:
        if not action.option_strings:
            out.add(action.dest)
        out |= {s for s in action.option_strings if s.startswith("--") and s not in common}
    return out


COMMANDS = sorted(name for name, app in get_commands().items() if app == "django_cdp")


def test_the_commands_are_found():
    assert "cdp_deliver" in COMMANDS and len(COMMANDS) >= 7


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_and_option_is_listed(name):
    assert first_column(section(f"`{name}`")) == _options(name)


def test_every_signal_is_listed():
    names = {n for n, v in vars(signals).items() if isinstance(v, Signal)}
    assert first_column(section("Signals")) == names
