"""The browser source's configuration (``DJANGO_CDP["FRONTEND"]``) and identity.

Used by the ``{% cdp_snippet %}`` template tag; kept apart from it so the
check and the identity logic can be imported without the template library.
"""

from __future__ import annotations

import json
from typing import Any

from django.core import checks
from django.core.serializers.json import DjangoJSONEncoder

from django_cdp import consent, payloads
from django_cdp.login import owner_of
from django_cdp.registry import registry
from django_cdp.settings import SETTING_NAME, cdp_settings

FRONTEND_KEYS = frozenset({"WRITE_KEY", "DATA_PLANE_URL", "SDK", "SDK_URL", "TRAITS", "PAGE"})
RUDDERSTACK, SEGMENT = "rudderstack", "segment"

_JS_ESCAPES = {
    ord("<"): "\\u003C",
    ord(">"): "\\u003E",
    ord("&"): "\\u0026",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def js_value(value: Any) -> str:
    """JSON for a value embedded in an inline ``<script>``, safe against ``</script>``."""
    return json.dumps(value, cls=DjangoJSONEncoder, ensure_ascii=False).translate(_JS_ESCAPES)


def is_server_key(key: Any) -> bool:
    """True when ``key`` is the server's ``WRITE_KEY``, which must never reach a browser.

    Anyone who reads a page could send events as the backend with a server
    source's write key; the browser needs a source (and write key) of its own.
    Check E012 reports it, and :func:`frontend_config` refuses it even when the
    check is silenced.
    """
    server = cdp_settings.WRITE_KEY
    return (
        isinstance(key, str)
        and isinstance(server, str)
        and bool(key.strip())
        and key.strip() == server.strip()
    )


def frontend_config() -> dict[str, Any] | None:
    """``FRONTEND`` with defaults, or None when the snippet must render nothing."""
    raw = cdp_settings.FRONTEND
    if not isinstance(raw, dict):
        return None
    config = {
        "WRITE_KEY": "",
        "DATA_PLANE_URL": "",
        "SDK": RUDDERSTACK,
        "SDK_URL": "",
        "TRAITS": [],
        "PAGE": True,
        **raw,
    }
    if not config["WRITE_KEY"] or is_server_key(config["WRITE_KEY"]) or not config["SDK_URL"]:
        return None
    if config["SDK"] == RUDDERSTACK and not config["DATA_PLANE_URL"]:
        return None
    if config["SDK"] not in (RUDDERSTACK, SEGMENT):
        return None
    return config


def browser_identity(user: Any, allowed: list[str]) -> tuple[str | None, dict[str, Any]] | None:
    """The userId and allowlisted traits of ``user``'s owner, as the backend would send them;
    None when the owner has no consent (``CONSENT``): then the page gets no SDK at all."""
    owner = owner_of(user)
    identity = registry.identity
    if owner is None or identity is None:
        return None, {}
    if not consent.allows_owner(owner):
        return None
    user_id = getattr(owner, identity.user_id_field.attname)
    if user_id is None or str(user_id) == "":
        return None, {}
    sources = tuple(s for s in identity.traits if s.name in set(allowed))
    return str(user_id), payloads.read_sources(owner, sources)


def check_frontend(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Checks E011 (the snippet would render nothing or leak) and E012 (the server's key)."""
    raw = cdp_settings.FRONTEND
    if not isinstance(raw, dict) or not raw:
        return []
    key = f"{SETTING_NAME}['FRONTEND']"
    problems: list[checks.CheckMessage] = []

    def error(msg: str, hint: str) -> None:
        problems.append(checks.Error(msg, hint=hint, id="django_cdp.E011"))

    for unknown in sorted(set(raw) - FRONTEND_KEYS, key=str):
        error(
            f"{key}[{unknown!r}] is not a front-end option.",
            "Known keys: " + ", ".join(sorted(FRONTEND_KEYS)) + ".",
        )
    sdk = raw.get("SDK", RUDDERSTACK)
    if sdk not in (RUDDERSTACK, SEGMENT):
        error(f"{key}['SDK'] = {sdk!r} is not supported.", "Use 'rudderstack' or 'segment'.")
    for name in ("WRITE_KEY", "DATA_PLANE_URL", "SDK_URL"):
        if not isinstance(raw.get(name, ""), str):
            error(f"{key}[{name!r}] must be a string.", "Read it from the environment.")
    if raw.get("WRITE_KEY") and not raw.get("SDK_URL"):
        error(
            f"{key}['SDK_URL'] is empty: the snippet renders nothing.",
            "Set it to the URL of the SDK loader script your project serves or allows in its "
            "Content-Security-Policy.",
        )
    if raw.get("WRITE_KEY") and sdk == RUDDERSTACK and not raw.get("DATA_PLANE_URL"):
        error(
            f"{key}['DATA_PLANE_URL'] is empty: the RudderStack snippet renders nothing.",
            "Set the data plane URL the browser sends to.",
        )
    if is_server_key(raw.get("WRITE_KEY")):
        problems.append(
            checks.Error(
                f"{key}['WRITE_KEY'] is the server write key {SETTING_NAME}['WRITE_KEY']: "
                "it would be rendered into every page that uses {% cdp_snippet %}.",
                hint="A server write key must never reach a browser: anyone could read it and "
                "send events as your backend. Create a browser (JavaScript) source in "
                "RudderStack or Segment and set its write key here; until then the snippet "
                "renders nothing.",
                id="django_cdp.E012",
            )
        )
    traits = raw.get("TRAITS", [])
    identity = registry.identity
    if not isinstance(traits, list | tuple) or not all(isinstance(t, str) for t in traits):
        error(f"{key}['TRAITS'] must be a list of trait names.", "Default: [] (no traits).")
    elif identity is not None:
        known = {s.name for s in identity.traits}
        for name in traits:
            if name not in known:
                error(
                    f"{key}['TRAITS'] names {name!r}, which is not an IDENTITY trait.",
                    "Known traits: " + ", ".join(sorted(known)) + ".",
                )
    if not isinstance(raw.get("PAGE", True), bool):
        error(f"{key}['PAGE'] must be True or False.", "Default: True (send a page view).")
    return problems
