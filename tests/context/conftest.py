"""Fixtures of the request-context tests: the core's outbox, run under both engines.

Not with the trigger engine deferring every statement: the demo view answers with the
messages its request wrote, which a deferred statement has not written yet when the view
reads them (``tests/triggers/test_deferred.py`` checks that deferred messages keep the
context of their statement).
"""

import pytest

from tests.core.conftest import ENGINES, Outbox, outbox, plan, shop, use_engine  # noqa: F401

__all__ = ["Outbox"]


@pytest.fixture(params=[name for name in ENGINES if name != "deferred"])
def engine(request, transactional_db, settings) -> str:
    return use_engine(settings, request.param)
