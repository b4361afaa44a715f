"""The packaging tests: one build of the distributions per run, and the delivery tests'
Redis fixture (skips without Redis, CI fails)."""

from __future__ import annotations

import pytest

from tests.delivery.conftest import redis_broker  # noqa: F401
from tests.packaging.dists import Dists, build


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    return build(tmp_path_factory.mktemp("dist"))
