"""Helpers for projects' own test suites: capture the messages a block of code emits.

Teams test their own code with django-cdp installed; asserting that "creating
a payout sends ``Payout Created`` with these properties" should not mean
digging through the outbox table by hand::

    from django_cdp.testing import capture_messages

    with capture_messages() as cdp:
        create_payout(shop, Decimal("12.50"))
    cdp.assert_tracked("Payout Created", properties={"amount": Decimal("12.50")})
    cdp.assert_identified(shop, traits={"plan": "Growth"})

or, with pytest (``pytest_plugins = ["django_cdp.testing"]`` in a conftest)::

    def test_payout(cdp_messages, shop):
        create_payout(shop, Decimal("12.50"))
        cdp_messages.assert_tracked("Payout Created")

Messages are recorded through the ``message_created`` signal, so capturing
works inside a ``TestCase``'s transaction and with ``transactional_db`` alike.
Rows are read back from the database when asserted on: a payload rewritten
by coalescing later in the transaction shows its final form, and a row that
coalescing discarded (create then delete) or a rolled-back savepoint removed
is gone, exactly as it would be from the outbox.

Nothing here is imported by django-cdp itself; the module imports Django
models lazily, so loading it as a pytest plugin before Django is set up is safe.
"""

from __future__ import annotations

import contextlib
import decimal
import itertools
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django.db import models

    from django_cdp.models import Message

__all__ = ["CapturedMessages", "capture_messages", "cdp_messages"]

_uids = itertools.count()


class CapturedMessages:
    """The messages written while a :func:`capture_messages` block ran, oldest first."""

    def __init__(self) -> None:
        self._ids: list[tuple[str, int]] = []  # (database alias, Message pk)

    def _record(self, sender: Any, message: Message, **kwargs: Any) -> None:
        if message.pk is not None:
            self._ids.append((message._state.db or "default", message.pk))

    # --- access ------------------------------------------------------------------------------

    @property
    def rows(self) -> list[Message]:
        """The captured :class:`~django_cdp.models.Message` rows as the database has them now."""
        from django_cdp.models import Message

        found: dict[tuple[str, int], Message] = {}
        for using, group in itertools.groupby(sorted(self._ids), key=lambda k: k[0]):
            pks = [pk for _, pk in group]
            for row in Message.objects.using(using).filter(pk__in=pks):
                found[(using, row.pk)] = row
        return [found[key] for key in dict.fromkeys(self._ids) if key in found]

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The captured payloads, parsed (numbers with a fraction as ``Decimal``, exactly)."""
        return [json.loads(row.payload, parse_float=decimal.Decimal) for row in self.rows]

    @property
    def tracks(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "track"]

    @property
    def identifies(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "identify"]

    @property
    def events(self) -> list[str]:
        """The names of the tracked events, in order."""
        return [m["event"] for m in self.tracks]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.messages)

    def clear(self) -> None:
        """Forget what was captured so far (the rows stay in the outbox)."""
        self._ids.clear()

    # --- queries -----------------------------------------------------------------------------

    def tracked(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        user: models.Model | str | None = None,
    ) -> list[dict[str, Any]]:
        """Tracks named ``event`` whose properties include ``properties`` (and of ``user``)."""
        user_id = _user_id(user)
        return [
            m
            for m in self.tracks
            if m.get("event") == event
            and (user_id is None or m.get("userId") == user_id)
            and _contains(m.get("properties") or {}, properties or {})
        ]

    def identified(
        self, user: models.Model | str, traits: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Identifies of ``user`` (an instance, meaning its owner, or a userId) with ``traits``."""
        user_id = _user_id(user)
        return [
            m
            for m in self.identifies
            if m.get("userId") == user_id and _contains(m.get("traits") or {}, traits or {})
        ]

    # --- assertions --------------------------------------------------------------------------

    def assert_tracked(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        user: models.Model | str | None = None,
        count: int | None = None,
    ) -> dict[str, Any]:
        """Assert that ``event`` was tracked with at least ``properties``; return the message.

        ``properties`` is a subset match, compared in JSON form (so
        ``Decimal("12.5")`` matches ``12.50`` and a datetime its ISO string).
        ``count`` asserts exactly that many matching messages.
        """
        found = self.tracked(event, properties, user=user)
        if not found or (count is not None and len(found) != count):
            wanted = f"{count} " if count is not None else ""
            raise AssertionError(
                f"expected {wanted}track {event!r}"
                + (f" with properties including {_show(properties)}" if properties else "")
                + (f" for userId {_user_id(user)!r}" if user is not None else "")
                + f", found {len(found)}.\n"
                + self._report()
            )
        return found[-1]

    def assert_not_tracked(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        user: models.Model | str | None = None,
    ) -> None:
        """Assert that no ``event`` with at least ``properties`` was tracked."""
        found = self.tracked(event, properties, user=user)
        if found:
            raise AssertionError(
                f"expected no track {event!r}"
                + (f" with properties including {_show(properties)}" if properties else "")
                + f", found {len(found)}.\n"
                + self._report()
            )

    def assert_identified(
        self, user: models.Model | str, traits: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Assert that the owner of ``user`` was identified with at least ``traits``."""
        found = self.identified(user, traits)
        if not found:
            raise AssertionError(
                f"expected an identify of userId {_user_id(user)!r}"
                + (f" with traits including {_show(traits)}" if traits else "")
                + ".\n"
                + self._report()
            )
        return found[-1]

    def assert_not_identified(self, user: models.Model | str) -> None:
        """Assert that the owner of ``user`` was not identified (e.g. unchanged traits)."""
        found = self.identified(user)
        if found:
            raise AssertionError(
                f"expected no identify of userId {_user_id(user)!r}, found {len(found)}.\n"
                + self._report()
            )

    def _report(self) -> str:
        messages = self.messages
        if not messages:
            return "Nothing was captured."
        lines = [f"Captured {len(messages)} message(s):"]
        for m in messages:
            if m["type"] == "track":
                lines.append(
                    f"  track {m.get('event')!r} userId={m.get('userId')!r} "
                    f"properties={_show(m.get('properties'))}"
                )
            else:
                lines.append(
                    f"  {m['type']} userId={m.get('userId')!r} traits={_show(m.get('traits'))}"
                )
        return "\n".join(lines)


def _user_id(user: Any) -> str | None:
    """The userId an instance stands for (its owner's), or the given string."""
    if user is None or isinstance(user, str):
        return user
    from django.db import router

    from django_cdp.capture.owners import resolve_owner
    from django_cdp.registry import registry

    config = registry.get(type(user))
    if config is None:
        raise TypeError(f"{user!r} is not an instance of a model django-cdp tracks")
    using = user._state.db or router.db_for_read(type(user), instance=user)
    owner = resolve_owner(user, config, using)
    return owner[1] if owner else None


def _json(value: Any) -> Any:
    from django_cdp import payloads

    return payloads.json_value(value, "expected")


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) and isinstance(actual, decimal.Decimal):
        return decimal.Decimal(repr(expected)) == actual
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            _equal(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(
            _equal(a, e) for a, e in zip(actual, expected, strict=True)
        )
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    return actual == expected


def _contains(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    return all(
        key in actual and _equal(actual[key], _json(value)) for key, value in expected.items()
    )


def _show(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


@contextlib.contextmanager
def capture_messages(
    *, new_transaction: bool = False, using: str | None = None
) -> Iterator[CapturedMessages]:
    """Capture the messages written inside the block.

    ``new_transaction=True`` makes the writer forget what it recorded earlier
    in the open transaction (on ``using``, or on every open connection), so
    that in a ``TestCase`` a save of an object created in ``setUp`` is
    recorded as ``Updated`` instead of being coalesced into its ``Created``
    (the whole test is one transaction there).
    """
    from django.db import connections

    from django_cdp.capture.state import forget_transaction
    from django_cdp.models import Message
    from django_cdp.signals import message_created

    if new_transaction:
        aliases = [using] if using else [c.alias for c in connections.all(initialized_only=True)]
        for alias in aliases:
            forget_transaction(alias)
    captured = CapturedMessages()
    uid = f"django_cdp.testing.capture_messages:{next(_uids)}"
    message_created.connect(captured._record, sender=Message, weak=False, dispatch_uid=uid)
    try:
        yield captured
    finally:
        message_created.disconnect(sender=Message, dispatch_uid=uid)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def cdp_messages() -> Iterator[CapturedMessages]:
        """The messages written during the test (enable with ``pytest_plugins``)."""
        with capture_messages() as captured:
            yield captured
