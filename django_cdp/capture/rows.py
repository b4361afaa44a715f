"""Building an outbox row: the one function that turns a message into what is stored.

Every writer calls :func:`build_row`: the signal receivers when they record a
change, the coalescing writer when it rewrites a row within its transaction,
``track()`` and ``identify()``, and ``cdp_backfill_identify``. So enrichment,
validation, encoding, the size limit and the no-userId rule are applied once,
in the same order, everywhere.

It runs before any SQL of ours and never raises for a message it cannot
build: reading a value, converting it, the ``ENRICH_MESSAGE`` hook, the
tracking-plan check and the encoding are all Python that can fail on the
user's data, and an exception escaping into the user's transaction would
break or roll back their write. Such a message becomes a ``failed`` row with
a minimal payload and a reason that names the model, the primary key and the
field (``tests.Reading pk=3: score: nan is not a JSON number``), visible in the
admin and never sent. The one exception that does propagate is
:class:`~django_cdp.validation.TrackingPlanViolation` in ``VALIDATION =
"raise"`` mode, which asks for exactly that, and it too is raised before any
SQL, so a caller that catches it keeps a working transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import models

from django_cdp import payloads, validation
from django_cdp.models import Message
from django_cdp.settings import cdp_settings

logger = logging.getLogger("django_cdp")

#: Where a message comes from: the model and primary key of the changed object (for an
#: identify, the owner).
SourceRef = tuple[type[models.Model], Any]

#: How much of a too-large message a failed row keeps in its reason.
EXCERPT_CHARS = 500


def source_of(instance: models.Model) -> SourceRef:
    return type(instance), instance.pk


def describe(source: SourceRef) -> str:
    return f"{source[0]._meta.label} pk={source[1]!r}"


def build_row(
    make: Callable[[], dict[str, Any]],
    minimal: dict[str, Any],
    *,
    instance: models.Model | None,
    source: SourceRef,
    error: str = "",
) -> Message:
    """An unsaved outbox row for the message ``make()`` returns.

    ``minimal`` is the same message without its data (no properties, no
    traits): the payload a failed row keeps when ``make()``, the enrichment
    hook, validation or encoding fails. ``error`` marks the row failed from the
    start (an owner that could not be resolved). The row is ``pending``, or
    ``failed`` with its reason (cannot be built, no userId, too large), or
    ``blocked`` by the tracking plan in ``block`` mode.
    """
    if error:
        return _failed(minimal, source, error)
    try:
        message = payloads.enrich(make(), instance)
        verdict = validation.validate(message)
        text = payloads.encode(message)
    except validation.TrackingPlanViolation:
        raise  # VALIDATION = "raise": the caller asked for it, and no SQL has run yet
    except Exception as exc:
        return _failed(minimal, source, _reason(exc))
    size = len(text.encode())
    status, reason = Message.Status.PENDING, ""
    if not message.get("userId"):
        status, reason = Message.Status.FAILED, "no userId"
    elif size > cdp_settings.MAX_MESSAGE_BYTES:
        limit = cdp_settings.MAX_MESSAGE_BYTES
        excerpt = text[:EXCERPT_CHARS]
        # The row keeps the minimal payload, the size and an excerpt, never the whole text.
        return _failed(
            minimal,
            source,
            f"too large ({size:,} > {limit:,} bytes); it begins: {excerpt}",
            log=f"too large ({size:,} > {limit:,} bytes)",
        )
    elif verdict.blocked:
        status, reason = Message.Status.BLOCKED, verdict.summary
    return _row(message, text, status, reason, source, verdict.violations)


def _reason(exc: Exception) -> str:
    if isinstance(exc, payloads.PayloadError):
        return str(exc)
    if isinstance(exc, ValueError | TypeError) and "JSON" in str(exc):
        return f"not JSON after ENRICH_MESSAGE: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _failed(minimal: dict[str, Any], source: SourceRef, reason: str, *, log: str = "") -> Message:
    text = payloads.encode(minimal)
    logger.error(
        "django-cdp: %s message %s for %s cannot be sent and is stored as failed: %s",
        minimal.get("event") or minimal["type"],
        minimal["messageId"],
        describe(source),
        log or reason,
    )
    return _row(minimal, text, Message.Status.FAILED, f"{describe(source)}: {reason}", source, [])


def _row(
    message: dict[str, Any],
    text: str,
    status: str,
    reason: str,
    source: SourceRef,
    violations: list[dict[str, Any]],
) -> Message:
    return Message(
        message_id=message["messageId"],
        type=message["type"],
        event=message.get("event", ""),
        user_id=message.get("userId") or "",
        payload=text,
        status=status,
        last_error=reason,
        source_model=source[0]._meta.label_lower,
        source_pk=str(source[1]),
        violations=violations,
    )
