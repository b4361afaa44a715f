"""Identify on login: how daily active customers are counted.

CDPs and the tools behind them count a customer as active on a day when an
identify (or an event) arrives for it that day. The traits of a merchant rarely
change, so the identifies django-cdp sends on changes say nothing about
activity; the login identify does, and so it is sent even when the traits are
unchanged (``force=True``).

``DJANGO_CDP["LOGIN"]`` names how to find the identified owner of a user::

    "LOGIN": {"owner": "shop"}                    # a field path from the user model
    "LOGIN": {"owner": "profile__shop"}           # through a one-to-one or foreign key
    "LOGIN": {"owner": "self"}                    # the user model is the identity model
    "LOGIN": {"owner": "myapp.analytics.owner_of", "track_sign_in": True}  # a function

A function takes the user and returns an instance of the identity model, or
None. ``track_sign_in`` adds a ``Signed In`` track event. A login never fails
because of tracking: every error here is logged and swallowed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in
from django.core import checks
from django.core.exceptions import ObjectDoesNotExist
from django.db import models, router, transaction
from django.utils.module_loading import import_string

from django_cdp.registry import fk_path_reaches, registry
from django_cdp.settings import SETTING_NAME, cdp_settings

logger = logging.getLogger("django_cdp")

SIGNED_IN = "Signed In"
SELF = "self"
LOGIN_KEYS = frozenset({"owner", "track_sign_in"})


def connect() -> None:
    """Connect the ``user_logged_in`` receiver (from ``AppConfig.ready()``)."""
    user_logged_in.connect(on_login, dispatch_uid="django_cdp.login.on_login")


def _is_function_path(owner: str) -> bool:
    # Field paths are joined with "__"; a dotted path names a module attribute.
    return "." in owner


@functools.lru_cache(maxsize=8)
def _function(path: str) -> Callable[[Any], Any]:
    return import_string(path)


def owner_of(user: Any) -> models.Model | None:
    """The identity-model instance that ``user`` belongs to, per ``LOGIN["owner"]``.

    None when login identify is not configured, the user is anonymous, or the
    path leads nowhere (a user without a profile). Errors of a function owner
    propagate: the callers log them.
    """
    config = cdp_settings.LOGIN
    owner = config.get("owner") if isinstance(config, dict) else None
    identity = registry.identity
    if not owner or identity is None or user is None or not user.is_authenticated:
        return None
    if owner == SELF:
        result = user
    elif _is_function_path(owner):
        result = _function(owner)(user)
    else:
        result = user
        for part in owner.split("__"):
            try:
                result = getattr(result, part)
            except ObjectDoesNotExist:  # a reverse one-to-one with no row
                return None
            if result is None:
                return None
    if result is None:
        return None
    if not isinstance(result, identity.model):
        raise TypeError(
            f"{SETTING_NAME}['LOGIN']['owner'] = {owner!r} gave {result!r}, "
            f"not a {identity.model._meta.label}"
        )
    return result


def on_login(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    """Identify the owner of the user who just logged in (and track ``Signed In``)."""
    config = cdp_settings.LOGIN
    if not (isinstance(config, dict) and config.get("owner")):
        return
    from django_cdp.api import identify, track
    from django_cdp.scope import tracking_active

    if not tracking_active():
        return
    try:
        owner = owner_of(user)
        if owner is None:
            return
        using = owner._state.db or router.db_for_write(type(owner), instance=owner)
        # A savepoint: a failure here rolls back only our rows, never the login's transaction.
        with transaction.atomic(using=using):
            identify(owner, force=True)
            if config.get("track_sign_in"):
                track(owner, SIGNED_IN)
    except Exception:
        logger.exception(
            "django-cdp could not identify the owner of user pk=%r at login; the login went "
            "through",
            getattr(user, "pk", None),
        )


def check_login(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """System check E010: ``LOGIN`` has unknown keys or its owner cannot be found."""
    config = cdp_settings.LOGIN
    if not isinstance(config, dict) or not config:
        return []  # off, or the wrong type (E001)
    key = f"{SETTING_NAME}['LOGIN']"
    problems: list[checks.CheckMessage] = []

    def error(msg: str, hint: str) -> None:
        problems.append(checks.Error(msg, hint=hint, id="django_cdp.E010"))

    for unknown in sorted(set(config) - LOGIN_KEYS, key=str):
        error(f"{key}[{unknown!r}] is not a login option.", "Known keys: owner, track_sign_in.")
    if not isinstance(config.get("track_sign_in", False), bool):
        error(f"{key}['track_sign_in'] must be True or False.", "Default: False.")
    owner = config.get("owner")
    identity = registry.identity
    if not isinstance(owner, str) or not owner:
        error(
            f"{key}['owner'] is missing: django-cdp cannot tell whose login it is.",
            "Give a field path from the user model to the identity model ('shop', "
            "'profile__shop'), 'self', or a dotted path to a function of the user.",
        )
        return problems
    if identity is None:
        return problems  # E002 says why
    if owner == SELF:
        if get_user_model() is not identity.model:
            error(
                f"{key}['owner'] = 'self' but the user model is not the identity model "
                f"{identity.model._meta.label}.",
                "Give the path from the user to the identity model.",
            )
    elif _is_function_path(owner):
        try:
            func = import_string(owner)
        except ImportError as exc:
            error(f"{key}['owner'] = {owner!r} cannot be imported: {exc}", "Check the path.")
        else:
            if not callable(func):
                error(f"{key}['owner'] = {owner!r} is not callable.", "Name a function.")
    elif not fk_path_reaches(get_user_model(), owner, identity.model, reverse_one_to_one=True):
        error(
            f"{key}['owner'] = {owner!r} does not lead from the user model "
            f"{get_user_model()._meta.label} to the identity model {identity.model._meta.label}.",
            "Follow foreign keys or one-to-one relations (either direction), e.g. 'shop' or "
            "'profile__shop'.",
        )
    return problems
