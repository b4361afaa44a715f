"""Switching tracking off for a block of code.

A ``ContextVar``, not a thread-local or a global flag, so that it holds in
threads and asyncio tasks alike and cannot leak from one request to another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from django_cdp.settings import cdp_settings

_disabled: ContextVar[bool] = ContextVar("django_cdp_tracking_disabled", default=False)


@contextlib.contextmanager
def tracking_disabled() -> Iterator[None]:
    """Record no messages inside the block (data migrations, imports, fixtures).

    Changes made inside are not tracked later either: use it where the data
    plane must not hear about the changes at all.
    """
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def tracking_active() -> bool:
    """Whether changes are recorded now: ``ENABLED`` and not inside :func:`tracking_disabled`."""
    return cdp_settings.ENABLED and not _disabled.get()
