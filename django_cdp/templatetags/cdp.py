"""``{% load cdp %}{% cdp_snippet %}``: the browser source, joined to the backend's identity.

A product is tracked from both ends. The snippet loads the RudderStack
JavaScript SDK (or Segment's analytics.js) with the front-end write key from
``DJANGO_CDP["FRONTEND"]`` and identifies the logged-in user's owner with the
same userId the backend sends, so the browser's anonymous page views and the
server's events join up on one profile.

What goes into the page is deliberately little:

* nothing at all unless a front-end write key and ``SDK_URL`` are configured
  (django-cdp names no SDK host of its own: the project chooses where the
  loader comes from, and its CSP must allow it);
* traits only from the ``TRAITS`` allowlist (default none: a page's HTML is
  cached, shared and inspected, and is no place for emails or plans);
* nothing for an owner without consent (``DJANGO_CDP["CONSENT"]``);
* the SDK keeps the visitor's anonymous id in its own cookie (``rl_anonymous_id``
  or ``ajs_anonymous_id``, :data:`django_cdp.anonymous.COOKIES`), which
  ``RequestContextMiddleware`` reads to stitch server events to the visit;
* the identify only when the SDK's stored userId differs (a returning visitor
  is not re-identified on every page view), and a ``reset()`` when nobody is
  logged in but the SDK still holds a userId (a shared computer after logout);
* every value through JSON with ``<``, ``>``, ``&`` and the JavaScript line
  separators escaped, like ``json_script``; the ``<script>`` carries the
  Content-Security-Policy nonce, which is also given to the SDK's script tag.
"""

from __future__ import annotations

import logging
from typing import Any

from django import template
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from django_cdp.frontend import SEGMENT, browser_identity, frontend_config, js_value

logger = logging.getLogger("django_cdp")
register = template.Library()

_RUDDERSTACK_JS = """(function () {
var c = %(config)s;
var ra = window.rudderanalytics = window.rudderanalytics || [];
if (ra.__djangoCdp) { return; }
ra.__djangoCdp = true;
var methods = ["setDefaultInstanceKey", "load", "ready", "page", "track", "identify", "alias",
  "group", "reset", "setAnonymousId", "startSession", "endSession", "consent"];
for (var i = 0; i < methods.length; i++) {
  ra[methods[i]] = (function (m) {
    return function () { ra.push([m].concat(Array.prototype.slice.call(arguments))); };
  })(methods[i]);
}
ra.load(c.writeKey, c.dataPlaneUrl);
ra.ready(function () {
  var sdk = window.rudderanalytics;
  var current = sdk.getUserId() || null;
  if (c.userId !== null && current !== c.userId) { sdk.identify(c.userId, c.traits); }
  else if (c.userId === null && current) { sdk.reset(); }
  if (c.page) { sdk.page(); }
});
var s = document.createElement("script");
s.async = true;
s.src = c.sdkUrl;
if (c.nonce) { s.nonce = c.nonce; }
(document.head || document.documentElement).appendChild(s);
})();"""

_SEGMENT_JS = """(function () {
var c = %(config)s;
var analytics = window.analytics = window.analytics || [];
if (analytics.initialize || analytics.invoked) { return; }
analytics.invoked = true;
var methods = ["trackSubmit", "trackClick", "trackLink", "trackForm", "pageview", "identify",
  "reset", "group", "track", "ready", "alias", "debug", "page", "screen", "once", "off", "on",
  "addSourceMiddleware", "addIntegrationMiddleware", "setAnonymousId", "addDestinationMiddleware",
  "register"];
analytics.factory = function (m) {
  return function () {
    var args = Array.prototype.slice.call(arguments);
    args.unshift(m);
    analytics.push(args);
    return analytics;
  };
};
for (var i = 0; i < methods.length; i++) { analytics[methods[i]] = analytics.factory(methods[i]); }
analytics.load = function (key) {
  var s = document.createElement("script");
  s.async = true;
  s.src = c.sdkUrl;
  if (c.nonce) { s.nonce = c.nonce; }
  (document.head || document.documentElement).appendChild(s);
};
analytics._writeKey = c.writeKey;
analytics.load(c.writeKey);
analytics.ready(function () {
  var sdk = window.analytics;
  var current = sdk.user().id() || null;
  if (c.userId !== null && current !== c.userId) { sdk.identify(c.userId, c.traits); }
  else if (c.userId === null && current) { sdk.reset(); }
  if (c.page) { sdk.page(); }
});
})();"""


def _nonce(context: template.Context, explicit: Any) -> str:
    if explicit:
        return str(explicit)
    if context.get("csp_nonce"):  # Django's csp context processor
        return str(context["csp_nonce"])
    request = context.get("request")
    nonce = getattr(request, "csp_nonce", None)  # django-csp and Django's CSP middleware
    return str(nonce) if nonce else ""


@register.simple_tag(takes_context=True)
def cdp_snippet(context: template.Context, nonce: Any = None) -> SafeString:
    """The browser SDK loader, identifying the logged-in user's owner; empty without a key."""
    config = frontend_config()
    if config is None:
        return mark_safe("")
    request = context.get("request")
    user = getattr(request, "user", None) or context.get("user")
    user_id: str | None = None
    traits: dict[str, Any] = {}
    try:
        allowed = config["TRAITS"] if isinstance(config["TRAITS"], list | tuple) else []
        identity = browser_identity(user, list(allowed))
        if identity is None:
            return mark_safe("")  # the owner has not consented: no SDK, no tracking
        user_id, traits = identity
    except Exception:
        # A page never fails because of analytics: render the loader without an identify.
        logger.exception("django-cdp could not find the browser identity of user %r", user)
    nonce_value = _nonce(context, nonce)
    data = {
        "writeKey": config["WRITE_KEY"],
        "dataPlaneUrl": config["DATA_PLANE_URL"],
        "sdkUrl": config["SDK_URL"],
        "userId": user_id,
        "traits": traits,
        "page": bool(config["PAGE"]),
        "nonce": nonce_value,
    }
    code = (_SEGMENT_JS if config["SDK"] == SEGMENT else _RUDDERSTACK_JS) % {
        "config": js_value(data)
    }
    if nonce_value:
        return format_html('<script nonce="{}">{}</script>', nonce_value, mark_safe(code))
    return format_html("<script>{}</script>", mark_safe(code))
