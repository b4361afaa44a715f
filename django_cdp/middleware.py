"""``RequestContextMiddleware``: the request behind a change, in the ``context`` of its messages.

A server-side event says who (``userId``) and what; destinations also want
where from: the IP for geolocation, the user agent for device reports, the
page for attribution, the locale, and the browser's ``anonymousId`` to stitch
the visit to the customer. Every message written while a request is handled
(tracks and identifies, by either capture engine) gets::

    "context": {"ip": ..., "userAgent": ..., "page": {"path", "url", "search", "referrer"},
                "locale": "en-US", "requestId": ..., "library": ...},
    "anonymousId": ...            # from the browser SDK's cookie, when there is one

The ``userId`` stays the owner's. Messages written outside a request carry none
of these. It is :func:`django_cdp.context` around the view, so anything the
view wraps in ``django_cdp.context(...)`` is added to it.

``DJANGO_CDP["REQUEST_CONTEXT"]`` switches each part off (docs/context-and-consent.md
says what each one tells the data plane). The client's address is ``REMOTE_ADDR``;
``X-Forwarded-For`` is read only with ``trusted_proxies`` set to the number of
reverse proxies in front of Django, and then the entry the outermost trusted
proxy added (the ``trusted_proxies``-th from the right), since everything left of
it is whatever the client sent.

Headers and cookies are the visitor's to write: a value that is malformed,
too long or not printable is left out, and nothing here can fail a request.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.utils import translation
from django.utils.translation.trans_real import parse_accept_lang_header

from django_cdp import anonymous, scope
from django_cdp.registry import did_you_mean
from django_cdp.settings import SETTING_NAME, cdp_settings

logger = logging.getLogger("django_cdp")

#: Every key of ``REQUEST_CONTEXT`` and its default.
DEFAULTS: dict[str, Any] = {
    "ip": True,
    "user_agent": True,
    "page": True,
    "locale": True,
    "request_id_header": "X-Request-ID",
    "anonymous_id": True,
    "trusted_proxies": 0,
}
#: The longest header value kept (user agents run to a few hundred characters).
MAX_HEADER = 1000
MIDDLEWARE_PATH = "django_cdp.middleware.RequestContextMiddleware"


def config() -> dict[str, Any]:
    """``REQUEST_CONTEXT`` over :data:`DEFAULTS` (a broken value is check ``E014``)."""
    raw = cdp_settings.REQUEST_CONTEXT
    return {**DEFAULTS, **(raw if isinstance(raw, dict) else {})}


def _text(value: Any, limit: int = MAX_HEADER) -> str | None:
    """A header's value if it is short, printable text; None otherwise."""
    return anonymous.short_text(value, limit)


def _address(value: str) -> str | None:
    """An IP address from a header entry (``[v6]:port`` and ``v4:port`` forms too)."""
    value = value.strip()
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def client_ip(request: HttpRequest, trusted_proxies: int) -> str | None:
    """The client's address: ``REMOTE_ADDR``, or behind ``trusted_proxies`` reverse proxies the
    ``X-Forwarded-For`` entry the outermost of them added (``REMOTE_ADDR`` when it has fewer)."""
    if trusted_proxies > 0:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        entries = [e for e in forwarded.split(",") if e.strip()] if forwarded else []
        if len(entries) >= trusted_proxies:
            found = _address(entries[-trusted_proxies])
            if found is not None:
                return found
    return _address(request.META.get("REMOTE_ADDR", ""))


def _locale(request: HttpRequest) -> str | None:
    """BCP 47 (``en-US``): the language Django chose, or the browser's first preference."""
    code = getattr(request, "LANGUAGE_CODE", None)
    if not isinstance(code, str) or not code:
        header = _text(request.META.get("HTTP_ACCEPT_LANGUAGE"))
        choices = parse_accept_lang_header(header) if header else ()
        code = next((lang for lang, _ in choices if lang != "*"), None)
    if not code or len(code) > 35 or not all(c.isalnum() or c in "-_" for c in code):
        return None
    return translation.to_locale(code).replace("_", "-")


def _page(request: HttpRequest) -> dict[str, str]:
    page = {"path": request.path}
    with contextlib.suppress(DisallowedHost):  # a Host not in ALLOWED_HOSTS: no URL
        page["url"] = request.build_absolute_uri()
    query = request.META.get("QUERY_STRING", "")
    page["search"] = f"?{query}" if query else ""
    page["referrer"] = _text(request.META.get("HTTP_REFERER")) or ""
    return page


def request_fields(request: HttpRequest) -> tuple[dict[str, Any], str | None]:
    """The ``context`` fields of a request and its ``anonymousId``, per ``REQUEST_CONTEXT``."""
    settings = config()
    fields: dict[str, Any] = {}
    if settings["ip"]:
        ip = client_ip(request, int(settings["trusted_proxies"]))
        if ip is not None:
            fields["ip"] = ip
    if settings["user_agent"]:
        agent = _text(request.META.get("HTTP_USER_AGENT"))
        if agent is not None:
            fields["userAgent"] = agent
    if settings["page"]:
        fields["page"] = _page(request)
    if settings["locale"]:
        locale = _locale(request)
        if locale is not None:
            fields["locale"] = locale
    header = settings["request_id_header"]
    if header:
        request_id = _text(request.headers.get(header), 200)
        if request_id is not None:
            fields["requestId"] = request_id
    anonymous_id = anonymous.anonymous_id(request.COOKIES) if settings["anonymous_id"] else None
    return fields, anonymous_id


def _safe_fields(request: HttpRequest) -> tuple[dict[str, Any], str | None]:
    try:
        return request_fields(request)
    except Exception:
        logger.exception("django-cdp could not read the request context; messages go without it")
        return {}, None


class RequestContextMiddleware:
    """Adds the request's context (and the browser's ``anonymousId``) to the messages written
    while it is handled. Works under WSGI and ASGI; put it after ``LocaleMiddleware`` to send
    the language Django chose."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        fields, anonymous_id = _safe_fields(request)
        with scope.enter(fields, anonymous_id):
            return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        fields, anonymous_id = _safe_fields(request)
        with scope.enter(fields, anonymous_id):
            return await self.get_response(request)


# --- checks -------------------------------------------------------------------------------------


def check_request_context(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E014: an unknown ``REQUEST_CONTEXT`` key or a value of the wrong kind. W004: RudderStack
    cookies are read, but the v1.1 SDK's (AES) cannot be without ``cryptography``."""
    raw = cdp_settings.REQUEST_CONTEXT
    if not isinstance(raw, dict):
        return []  # E001 reports the type
    key = f"{SETTING_NAME}['REQUEST_CONTEXT']"
    problems: list[checks.CheckMessage] = []

    def error(msg: str, hint: str) -> None:
        problems.append(
            checks.Error(msg, hint=f"{hint} See docs/context-and-consent.md.", id="django_cdp.E014")
        )

    for name in sorted(set(raw) - set(DEFAULTS), key=str):
        error(
            f"{key}[{name!r}] is not a request-context option." + did_you_mean(name, DEFAULTS),
            "Known keys: " + ", ".join(sorted(DEFAULTS)) + ".",
        )
    for name in ("ip", "user_agent", "page", "locale", "anonymous_id"):
        if name in raw and not isinstance(raw[name], bool):
            error(f"{key}[{name!r}] must be True or False.", "Default: True.")
    proxies = raw.get("trusted_proxies", 0)
    if isinstance(proxies, bool) or not isinstance(proxies, int) or proxies < 0:
        error(
            f"{key}['trusted_proxies'] must be a whole number of proxies, not {proxies!r}.",
            "The number of reverse proxies in front of Django that append to X-Forwarded-For; "
            "0 (the default) trusts no header and takes REMOTE_ADDR.",
        )
    header = raw.get("request_id_header", DEFAULTS["request_id_header"])
    if header is not None and not (isinstance(header, str) and header.strip()):
        error(
            f"{key}['request_id_header'] must be a header name or None, not {header!r}.",
            "Default: 'X-Request-ID'.",
        )
    rudderstack_cookie = anonymous.COOKIES[anonymous.RUDDERSTACK]
    if (
        MIDDLEWARE_PATH in getattr(django_settings, "MIDDLEWARE", ())
        and config()["anonymous_id"]
        and rudderstack_cookie in anonymous.cookie_names()
        and not anonymous.legacy_supported()
    ):
        problems.append(
            checks.Warning(
                f"{rudderstack_cookie} cookies of RudderStack's v1.1 JavaScript SDK "
                "(RudderEncrypt:) cannot be read without the cryptography package; such "
                "requests are tracked without their anonymousId.",
                hint="pip install 'django-cdp[rudderstack-legacy]', or ignore this when your "
                "site loads the v3 SDK (its cookies are read without it).",
                id="django_cdp.W004",
            )
        )
    return problems
