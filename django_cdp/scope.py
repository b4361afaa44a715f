"""What applies to the messages written in a block of code: tracking off, and their context.

Both are ``ContextVar``\\ s, not thread-locals or global flags, so that they hold in
threads and asyncio tasks alike and cannot leak from one request to another
(asgiref copies them into the threads ``sync_to_async`` runs code in).

* :func:`tracking_disabled` records no messages inside its block.
* :func:`context` adds fields to the ``context`` of the messages written inside
  its block, on both capture engines: the signal engine reads :func:`current`
  when it builds a message (:func:`django_cdp.payloads`), the trigger engine
  receives :func:`current_sql` with each write
  (:mod:`django_cdp.capture.context`). ``RequestContextMiddleware`` is built
  on it, and also sets the browser's ``anonymousId``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

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


# --- context --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ambient:
    """The fields the messages written now carry: ``context`` entries and the browser's
    ``anonymousId``, with their JSON for the triggers computed once per block."""

    context: Mapping[str, Any] = field(default_factory=dict)
    anonymous_id: str | None = None
    sql: str = ""  # JSON text for the trigger engine; "" when there is nothing to add


_NONE = Ambient()
_ambient: ContextVar[Ambient] = ContextVar("django_cdp_context", default=_NONE)


def _merged(outer: Mapping[str, Any], inner: Mapping[str, Any]) -> dict[str, Any]:
    """``inner`` over ``outer``, dict values merged key by key (inner wins)."""
    out = dict(outer)
    for key, value in inner.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _json_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields as plain JSON values (datetimes, decimals, UUIDs and lazy strings as
    strings); a value JSON has no form for raises ``TypeError`` naming its field."""
    out = {}
    for name, value in fields.items():
        try:
            out[name] = json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"django_cdp.context(): {name}={value!r} is not JSON: {exc}") from exc
    return out


def _ambient_of(context: dict[str, Any], anonymous_id: str | None) -> Ambient:
    if not context and anonymous_id is None:
        return _NONE
    data: dict[str, Any] = {"context": context}
    if anonymous_id is not None:
        data["anonymousId"] = anonymous_id
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return Ambient(context, anonymous_id, text)


@contextlib.contextmanager
def enter(fields: Mapping[str, Any], anonymous_id: str | None = None) -> Iterator[None]:
    """Add ``fields`` to the context (and set ``anonymousId``) for the block; blocks nest,
    the inner one's values win, and the outer context is back on exit."""
    outer = _ambient.get()
    context = _merged(outer.context, _json_fields(fields))
    token = _ambient.set(_ambient_of(context, anonymous_id or outer.anonymous_id))
    try:
        yield
    finally:
        _ambient.reset(token)


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to the ``context`` of every message written inside the block.

    For writes that are not requests (Celery tasks, imports, scripts)::

        with django_cdp.context(source="nightly-import"):
            import_payouts()

    Tracks and identifies alike, on both capture engines. Blocks nest: the inner
    block's fields are added to the outer's (a dict value merged key by key) and
    win where both name the same field. ``library`` (and an identify's
    ``traits``) stay django-cdp's own. A value with no JSON form raises
    ``TypeError`` naming it, when the block is entered.
    """
    with enter(fields):
        yield


def current() -> Ambient:
    """The context of the messages written now (empty outside any block)."""
    return _ambient.get()


def current_sql() -> str:
    """The context as the triggers read it (``django_cdp.context``); ``""`` for none."""
    return _ambient.get().sql
