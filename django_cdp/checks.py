"""System checks: a misconfigured ``DJANGO_CDP`` fails ``manage.py check``, naming the key.

Ids are stable (users silence them by id):

- ``E001`` unknown top-level key, wrong type, or an ``ENRICH_MESSAGE`` that does not import;
  ``E002`` identity missing or unknown;
  ``E003`` unknown model label; ``E004`` broken trait path; ``E005`` broken property path;
  ``E006`` owner missing or not reaching the identity model; ``E007`` unknown event kind;
  ``E008`` unknown per-model key; ``E009`` broken ``EVENTS`` entry or unknown ``VALIDATION``
  mode; ``E010`` broken ``LOGIN`` (unknown key, owner path or function not found);
  ``E011`` broken ``FRONTEND`` (unknown key or SDK, missing ``SDK_URL``, unknown trait).
  ``E014`` broken ``REQUEST_CONTEXT`` (unknown key, a value of the wrong kind).
  ``E015`` ``CONSENT`` names neither a BooleanField of the identity model nor a function.
  ``E013`` a model asks for ``capture = "triggers"`` (or ``CAPTURE``) but the triggers
  cannot compute its mapping there, or ``VALIDATION = "raise"`` with triggers.
- ``W001`` no write key or data plane URL: messages wait as pending.
- ``W002`` ``DELIVERY = "celery"`` but no Celery broker configured.
- ``W004`` RudderStack v1.1 cookies (AES) cannot be read without ``cryptography``.
- ``I001`` a database that holds the outbox cannot ``SKIP LOCKED``: run a single delivery
  worker. A database check: shown by ``migrate`` and ``check --database <alias>``, not by
  every command.
- ``I002`` (database check) which engine captures each registered model there, and why.
- ``W003`` (database check) capture triggers missing or outdated after a settings change:
  ``migrate`` or ``cdp_triggers install`` updates them.

None of these queries a table or connects to the broker, so ``check`` works before
``migrate`` and without a broker running (I001 asks only the backend's features; W003 reads
the catalog of the database it is given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings as django_settings
from django.core import checks
from django.db import connections, router

from django_cdp import consent, dictionary, frontend, login, middleware
from django_cdp.models import Message
from django_cdp.registry import DOCS_BASE, SETTINGS_DOC, registry
from django_cdp.settings import SETTING_NAME, cdp_settings

DELIVERY_DOC = "docs/delivery.md"


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
                f"or SEND = False to record messages as skipped. See {DOCS_BASE}{SETTINGS_DOC}.",
                id="django_cdp.W001",
            )
        )
    if cdp_settings.DELIVERY == "celery" and not celery_broker_configured():
        messages.append(
            checks.Warning(
                f"{SETTING_NAME}['DELIVERY'] is 'celery' but no Celery broker is configured: "
                "each commit would try Celery's default amqp://localhost and the messages "
                "would wait in the outbox.",
                hint="Configure a broker (CELERY_BROKER_URL, read by your Celery app), or set "
                f"{SETTING_NAME}['DELIVERY'] = 'manual' and run `manage.py cdp_deliver` "
                f"(--loop, or from cron). See {DOCS_BASE}{DELIVERY_DOC}.",
                id="django_cdp.W002",
            )
        )
    return messages


def celery_broker_configured() -> bool:
    """Whether Celery has a broker URL, read from configuration only (nothing connects).

    The delivery task publishes through the current Celery app, whose
    ``broker_write_url`` falls back to ``broker_url`` and the ``CELERY_BROKER_URL``
    environment variable. Django's ``CELERY_BROKER_URL`` / ``BROKER_URL`` count
    too: the project's Celery app reads them, even when it has not been imported in
    this process yet (then ``current_app`` is Celery's unconfigured default app).
    An eager app runs the task in-process and needs no broker.
    """
    from celery import current_app

    conf = current_app.conf
    return bool(
        conf.task_always_eager
        or conf.broker_write_url
        or getattr(django_settings, "CELERY_BROKER_URL", None)
        or getattr(django_settings, "BROKER_URL", None)
    )


def check_outbox_databases(
    app_configs: Any = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """I001 for each database given that holds the outbox and cannot ``SKIP LOCKED``.

    Registered with the ``database`` tag, so Django passes ``databases`` only for
    ``migrate`` (the database being migrated) and ``check --database``: the note
    appears when the outbox is created on such a database, not on every
    ``runserver`` or ``shell``. A database the router keeps the outbox off
    (``allow_migrate`` false for ``Message``) is not mentioned.
    """
    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        connection = connections[alias]
        if not router.allow_migrate_model(alias, Message):
            continue
        if connection.features.has_select_for_update_skip_locked:
            continue
        messages.append(
            checks.Info(
                f"Database {alias!r} ({connection.vendor}) cannot claim outbox "
                "rows with SELECT ... FOR UPDATE SKIP LOCKED.",
                hint="django-cdp claims with a conditional UPDATE there: run a single "
                "delivery worker for it (fine for development). "
                f"See {DOCS_BASE}{DELIVERY_DOC}#sqlite.",
                id="django_cdp.I001",
            )
        )
    return messages


TRIGGERS_DOC = "docs/triggers.md"


def check_capture(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E013: triggers asked for where they cannot compute the mapping (or cannot raise)."""
    from django_cdp.capture import engines

    messages: list[checks.CheckMessage] = []
    for config in registry:
        if engines.requested(config) != engines.TRIGGERS:
            continue
        key = (
            f"{SETTING_NAME}['MODELS'][{config.label!r}]['capture']"
            if config.capture
            else f"{SETTING_NAME}['CAPTURE']"
        )
        vendor = connections[engines.database_of(config.model)].vendor
        choice = engines.choose(config, vendor)
        if choice.engine != engines.TRIGGERS:
            messages.append(
                checks.Error(
                    f"{key} = 'triggers', but {config.label} cannot be captured by triggers: "
                    f"{choice.reason}.",
                    hint="Use 'auto' (triggers where they can, signals elsewhere) or 'signals' "
                    f"for this model. See {DOCS_BASE}{TRIGGERS_DOC}#which-engine.",
                    id="django_cdp.E013",
                )
            )
        elif cdp_settings.VALIDATION == "raise":
            messages.append(
                checks.Error(
                    f"{SETTING_NAME}['VALIDATION'] = 'raise' cannot raise from a trigger, and "
                    f"{config.label} is captured by triggers ({key} = 'triggers').",
                    hint="Use 'flag' or 'block' (checked at delivery for trigger-written "
                    f"messages). See {DOCS_BASE}{TRIGGERS_DOC}#python-at-delivery.",
                    id="django_cdp.E013",
                )
            )
    return messages


def check_triggers(
    app_configs: Any = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """I002 (the engine of each model) and W003 (triggers missing or outdated) per database."""
    from django_cdp.capture import engines, triggers

    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        if not router.allow_migrate_model(alias, Message):
            continue
        rows = triggers.status(alias)
        lines = "; ".join(f"{row.label}: {row.engine} ({row.reason})" for row in rows)
        messages.append(
            checks.Info(
                f"Capture engines on database {alias!r}: {lines}.",
                hint=f"See {DOCS_BASE}{TRIGGERS_DOC}#which-engine.",
                id="django_cdp.I002",
            )
        )
        stale = [row for row in rows if row.engine == engines.TRIGGERS and not row.ok]
        # A database that never had them (a new one, before its first migrate) is not stale:
        # migrate installs them.
        if stale and any(row.installed for row in rows):
            names = ", ".join(f"{row.label} ({row.state})" for row in stale)
            messages.append(
                checks.Warning(
                    f"Capture triggers on database {alias!r} do not match DJANGO_CDP: {names}.",
                    hint="Run `manage.py migrate` or `manage.py cdp_triggers install`; until "
                    "then these models are captured as the installed triggers say. "
                    f"See {DOCS_BASE}{TRIGGERS_DOC}#installation.",
                    id="django_cdp.W003",
                )
            )
    return messages


def register() -> None:
    checks.register(check_settings, "django_cdp")
    checks.register(check_delivery, "django_cdp")
    checks.register(check_outbox_databases, "django_cdp", checks.Tags.database)
    checks.register(check_capture, "django_cdp")
    checks.register(check_triggers, "django_cdp", checks.Tags.database)
    checks.register(dictionary.check_plan, "django_cdp")
    checks.register(login.check_login, "django_cdp")
    checks.register(frontend.check_frontend, "django_cdp")
    checks.register(middleware.check_request_context, "django_cdp")
    checks.register(consent.check_consent, "django_cdp")
