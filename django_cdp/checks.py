"""System checks: a misconfigured ``DJANGO_CDP`` fails ``manage.py check``, naming the key.

Ids are stable (users silence them by id):

- ``E001`` unknown top-level key or wrong type; ``E002`` identity missing or unknown;
  ``E003`` unknown model label; ``E004`` broken trait path; ``E005`` broken property path;
  ``E006`` owner missing or not reaching the identity model; ``E007`` unknown event kind;
  ``E008`` unknown per-model key; ``E009`` broken ``EVENTS`` entry or unknown ``VALIDATION``
  mode; ``E010`` broken ``LOGIN`` (unknown key, owner path or function not found);
  ``E011`` broken ``FRONTEND`` (unknown key or SDK, missing ``SDK_URL``, unknown trait).
- ``W001`` no write key or data plane URL: messages wait as pending.
- ``I001`` the outbox database cannot ``SKIP LOCKED``: run a single delivery worker.

None of these reads the database, so ``check`` works before ``migrate``.
"""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.db import connections

from django_cdp import dictionary, frontend, login
from django_cdp.registry import registry
from django_cdp.settings import SETTING_NAME, cdp_settings


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    return registry.problems


def check_delivery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    if cdp_settings.SEND and not (cdp_settings.WRITE_KEY and cdp_settings.DATA_PLANE_URL):
        missing = [k for k in ("WRITE_KEY", "DATA_PLANE_URL") if not getattr(cdp_settings, k)]
        messages.append(
            checks.Warning(
                f"{SETTING_NAME}[{missing[0]!r}] is empty: messages are stored as pending "
                "and nothing is sent.",
                hint="Set " + " and ".join(missing) + " (for example from the environment), "
                "or SEND = False to record messages as skipped.",
                id="django_cdp.W001",
            )
        )
    for alias in connections:
        features = connections[alias].features
        if not features.has_select_for_update_skip_locked:
            messages.append(
                checks.Info(
                    f"Database {alias!r} ({connections[alias].vendor}) cannot claim outbox "
                    "rows with SELECT ... FOR UPDATE SKIP LOCKED.",
                    hint="django-cdp claims with a conditional UPDATE there: run a single "
                    "delivery worker for it (fine for development).",
                    id="django_cdp.I001",
                )
            )
    return messages


def register() -> None:
    checks.register(check_settings, "django_cdp")
    checks.register(check_delivery, "django_cdp")
    checks.register(dictionary.check_plan, "django_cdp")
    checks.register(login.check_login, "django_cdp")
    checks.register(frontend.check_frontend, "django_cdp")
