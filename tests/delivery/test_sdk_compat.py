"""Our messages have the structure of rudder-sdk-python's, except where deliberately different."""

from __future__ import annotations

from typing import Any

import pytest

from django_cdp.delivery import drain
from django_cdp.models import Message
from tests.delivery.conftest import WRITE_KEY, make_messages

pytestmark = pytest.mark.django_db

# Deliberate differences: ids (we omit a null anonymousId), timestamps (per-message
# originalTimestamp + sentAt instead of timestamp, so the data plane corrects skew).
IDS = {"messageId", "userId", "anonymousId"}
TIMESTAMPS = {"timestamp", "originalTimestamp", "sentAt"}


def shape(value: Any) -> Any:
    """Keys and JSON types, recursively."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return (
        "number"
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else type(value).__name__
    )


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    message = {k: v for k, v in message.items() if k not in IDS | TIMESTAMPS}
    context = dict(message["context"])
    context["library"] = {**context["library"], "name": "<library>"}
    message["context"] = context
    if message["type"] == "identify" and "traits" in message:
        assert message.pop("traits") == context["traits"]  # ours: also top level
    return shape(message)


def test_same_structure_as_rudder_sdk(configure, data_plane):
    from rudderstack.analytics.client import Client

    properties = {"id": 0, "amount": 125.5, "currency": "EUR", "status": "pending"}
    traits = {"domain": "shop1.example", "email": "m1@example.com"}
    client = Client(WRITE_KEY, host=data_plane.url, sync_mode=True)
    client.track("1", "Payout Created", properties)
    client.identify("1", traits)
    sdk_track, sdk_identify = data_plane.messages

    make_messages(1)
    make_messages(1, kind="identify")
    assert drain().sent == 2
    ours_track, ours_identify = data_plane.messages[2:]

    for ours, sdk in [(ours_track, sdk_track), (ours_identify, sdk_identify)]:
        assert comparable(ours) == comparable(sdk)
        assert "timestamp" in sdk and "timestamp" not in ours
        assert {"originalTimestamp", "sentAt"} <= set(ours)
        assert isinstance(ours["messageId"], str) and isinstance(ours["userId"], str)
        assert ours["context"]["library"]["name"] == "django-cdp"
    assert ours_track["properties"] == properties
    assert Message.objects.filter(status="sent").count() == 2
