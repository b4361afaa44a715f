"""Fixtures shared by the dictionary, validation, login and snippet tests."""

from tests.core.conftest import Outbox, outbox, plan, shop  # noqa: F401

__all__ = ["Outbox"]
