"""Fixtures of the request-context tests: the core's outbox, run under every engine."""

from tests.core.conftest import Outbox, engine, outbox, plan, shop  # noqa: F401

__all__ = ["Outbox"]
