"""The packaging tests use the delivery tests' Redis fixture (skips without Redis, CI fails)."""

from tests.delivery.conftest import redis_broker  # noqa: F401
