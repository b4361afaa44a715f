"""ENRICH_MESSAGE hooks of the trust suite."""

from __future__ import annotations

from typing import Any


def add_nan(message: dict[str, Any], instance: Any) -> dict[str, Any]:
    """Adds a value with no JSON form: the row must fail, never carry a bare ``NaN``."""
    message["context"]["load"] = float("nan")
    return message
