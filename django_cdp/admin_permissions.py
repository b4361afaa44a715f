"""Who may see messages: one rule for every page that shows them.

Payloads are customer data, so the delivery log, the live events, the health
page, the event dictionary and the "Analytics events" section of
``AnalyticsEventsMixin`` all ask :func:`can_view_messages`, and a user sees all
of them or none. The rule is Django admin's own for a model: the view
permission, or the change permission (which implies view), so the admin index
lists the log for exactly the users these pages let in.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_permission_codename

from django_cdp.models import Message


def can_view_messages(user: Any) -> bool:
    """True when ``user`` has ``django_cdp.view_message`` or ``django_cdp.change_message``."""
    opts = Message._meta
    return any(
        user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
        for action in ("view", "change")
    )
