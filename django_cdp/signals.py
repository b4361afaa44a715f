"""Signals for users' own hooks (metrics, alerting, auditing).

``message_created`` is sent right after a message row is written (inside the
user's transaction: use ``transaction.on_commit`` in a receiver that talks to
the outside world). ``message_sent`` and ``message_failed`` are sent by
delivery after the outcome is recorded. Every signal passes ``message``, the
:class:`django_cdp.models.Message` instance.
"""

from django.dispatch import Signal

message_created = Signal()
message_sent = Signal()
message_failed = Signal()
