"""RequestContextMiddleware: what the data plane learns of the request behind a change."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import os
import uuid
from decimal import Decimal
from urllib.parse import quote

import pytest
from asgiref.sync import async_to_sync, iscoroutinefunction
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from django.conf import settings as django_settings
from django.core.management import call_command
from django.http import HttpResponse

from django_cdp import anonymous, scope
from django_cdp.middleware import MIDDLEWARE_PATH, check_request_context
from example_project.payouts.models import Payout

VISITOR = str(uuid.UUID("39ee7ea5-b6d8-4174-b612-04e1ef3fa952"))
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"


@pytest.fixture
def middleware(settings):
    settings.MIDDLEWARE = [*django_settings.MIDDLEWARE, MIDDLEWARE_PATH]
    settings.ALLOWED_HOSTS = ["shop.example", "testserver"]


def configure(settings, request_context=None, **overrides):
    config = copy.deepcopy(settings.DJANGO_CDP)
    config["REQUEST_CONTEXT"] = request_context or {}
    config.update(overrides)
    settings.DJANGO_CDP = config


def post(client, shop, path_suffix="", cookies=None, **headers):
    for name, value in (cookies or {}).items():
        client.cookies[name] = value
    response = client.post(f"/context/shops/{shop.pk}/payouts/{path_suffix}", **headers)
    assert response.status_code == 200, response.content
    return response


def message(outbox) -> dict:
    [track] = outbox.tracks()
    return track


# --- the SDKs' cookies, written as the SDKs write them -----------------------------------------


def rudderstack_v3(value: str) -> str:
    """``RS_ENC_v3_`` + base64 of the JSON string, through encodeURIComponent."""
    return quote("RS_ENC_v3_" + base64.b64encode(json.dumps(value).encode()).decode(), safe="")


def rudderstack_legacy(value: str) -> str:
    """CryptoJS ``AES.encrypt(JSON, "Rudder")``: OpenSSL's salted format, EVP_BytesToKey."""
    salt = os.urandom(8)
    derived, block = b"", b""
    while len(derived) < 48:
        block = hashlib.md5(block + b"Rudder" + salt).digest()
        derived += block
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(value).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:48])).encryptor()
    data = b"Salted__" + salt + encryptor.update(plain) + encryptor.finalize()
    return quote("RudderEncrypt:" + base64.b64encode(data).decode(), safe="")


def segment_classic(value: str) -> str:
    """Analytics.js Classic: the JSON string, URL-encoded (``%22…%22``)."""
    return quote(json.dumps(value), safe="")


# --- every field -------------------------------------------------------------------------------


def test_every_field_of_a_request_reaches_tracks_and_identifies(
    client, middleware, settings, shop, outbox, engine
):
    configure(settings)
    post(
        client,
        shop,
        "?utm_source=mail&x=1",
        cookies={"rl_anonymous_id": rudderstack_v3(VISITOR)},
        HTTP_HOST="shop.example",
        REMOTE_ADDR="203.0.113.9",
        HTTP_USER_AGENT=BROWSER,
        HTTP_REFERER="https://shop.example/payouts/",
        HTTP_ACCEPT_LANGUAGE="de-ch,de;q=0.8,en;q=0.5",
        HTTP_X_REQUEST_ID="req-42",
    )
    track = message(outbox)
    assert track["userId"] == str(shop.pk)  # the owner's, unchanged
    assert track["anonymousId"] == VISITOR
    assert track["context"] == {
        "ip": "203.0.113.9",
        "userAgent": BROWSER,
        "page": {
            "path": f"/context/shops/{shop.pk}/payouts/",
            "url": f"http://shop.example/context/shops/{shop.pk}/payouts/?utm_source=mail&x=1",
            "search": "?utm_source=mail&x=1",
            "referrer": "https://shop.example/payouts/",
        },
        "locale": "de-CH",
        "requestId": "req-42",
        "library": track["context"]["library"],
    }


def test_an_identify_written_in_a_request_carries_the_context(
    rf, middleware, settings, shop, outbox, engine
):
    from django_cdp.middleware import RequestContextMiddleware

    configure(settings)

    def view(request):
        shop.email = "new@acme.example"
        shop.save()
        return None

    request = rf.get("/settings/", REMOTE_ADDR="198.51.100.7")
    request.COOKIES["ajs_anonymous_id"] = VISITOR
    RequestContextMiddleware(view)(request)
    [identify] = outbox.identifies()
    assert identify["context"]["ip"] == "198.51.100.7"
    assert identify["context"]["page"]["path"] == "/settings/"
    assert identify["anonymousId"] == VISITOR


def test_messages_written_after_the_request_carry_none_of_it(
    client, middleware, settings, shop, outbox, engine
):
    configure(settings)
    post(client, shop, cookies={"ajs_anonymous_id": VISITOR}, HTTP_USER_AGENT=BROWSER)
    outbox.clear()
    Payout.objects.create(shop=shop, amount=Decimal("5.00"), currency="EUR")
    track = message(outbox)
    assert set(track["context"]) == {"library"}
    assert "anonymousId" not in track


# --- ASGI --------------------------------------------------------------------------------------


def test_an_async_view_under_asgi_sees_the_context_and_its_messages_carry_it(
    async_client, middleware, settings, shop, outbox, engine
):
    configure(settings)
    async_client.cookies["ajs_anonymous_id"] = VISITOR
    response = async_to_sync(async_client.post)(
        f"/context/shops/{shop.pk}/payouts-async/?from=asgi",
        headers={"User-Agent": BROWSER, "X-Request-ID": "async-1"},
    )
    assert response.status_code == 200, response.content
    seen = response.json()["context"]
    assert seen["userAgent"] == BROWSER
    assert seen["requestId"] == "async-1"
    assert seen["page"]["search"] == "?from=asgi"
    track = message(outbox)
    assert track["properties"]["id"] == response.json()["pk"]
    assert track["anonymousId"] == VISITOR
    assert {k: track["context"][k] for k in seen} == seen


def test_the_middleware_is_a_coroutine_around_an_async_view_and_resets_after_it(rf, settings):
    from django_cdp.middleware import RequestContextMiddleware

    configure(settings)
    inside = {}

    async def view(request):
        await asyncio.sleep(0)  # the context survives a suspension
        inside.update(scope.current().context)
        return HttpResponse("ok")

    middleware = RequestContextMiddleware(view)
    assert iscoroutinefunction(middleware)  # Django then calls it without a thread hop
    request = rf.get("/async/", HTTP_USER_AGENT=BROWSER, REMOTE_ADDR="198.51.100.7")
    response = asyncio.run(middleware(request))
    assert response.content == b"ok"
    assert inside["ip"] == "198.51.100.7"
    assert inside["userAgent"] == BROWSER
    assert inside["page"]["path"] == "/async/"
    assert scope.current().context == {}


def test_the_language_django_chose_wins_over_the_header(rf, middleware, settings, db):
    from django_cdp.middleware import request_fields

    configure(settings)
    request = rf.get("/", HTTP_ACCEPT_LANGUAGE="fr")
    request.LANGUAGE_CODE = "en-us"
    assert request_fields(request)[0]["locale"] == "en-US"


def test_a_configured_request_id_header(client, middleware, settings, shop, outbox):
    configure(settings, {"request_id_header": "X-Amzn-Trace-Id"})
    post(client, shop, HTTP_X_REQUEST_ID="ignored", HTTP_X_AMZN_TRACE_ID="Root=1-abc")
    assert message(outbox)["context"]["requestId"] == "Root=1-abc"


@pytest.mark.parametrize(
    "part, gone",
    [
        ("ip", "ip"),
        ("user_agent", "userAgent"),
        ("page", "page"),
        ("locale", "locale"),
        ("request_id_header", "requestId"),
    ],
)
def test_each_part_can_be_switched_off(client, middleware, settings, shop, outbox, part, gone):
    configure(settings, {part: None if part == "request_id_header" else False})
    post(
        client,
        shop,
        HTTP_USER_AGENT=BROWSER,
        HTTP_ACCEPT_LANGUAGE="en",
        HTTP_X_REQUEST_ID="r1",
    )
    context = message(outbox)["context"]
    assert gone not in context
    assert {"ip", "userAgent", "page", "locale", "requestId"} - {gone} <= set(context)


def test_the_anonymous_id_can_be_switched_off(client, middleware, settings, shop, outbox):
    configure(settings, {"anonymous_id": False})
    post(client, shop, cookies={"ajs_anonymous_id": VISITOR})
    assert "anonymousId" not in message(outbox)


# --- client IP and proxies ---------------------------------------------------------------------


def test_x_forwarded_for_is_not_trusted_by_default(client, middleware, settings, shop, outbox):
    configure(settings)
    post(client, shop, REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="6.6.6.6")
    assert message(outbox)["context"]["ip"] == "10.0.0.2"


@pytest.mark.parametrize(
    "proxies, forwarded, expected",
    [
        (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # the left entry is the client's to write
        (2, "6.6.6.6, 203.0.113.9, 10.0.0.1", "203.0.113.9"),
        (1, "[2001:db8::1]:4711", "2001:db8::1"),
        (1, "203.0.113.9:51234", "203.0.113.9"),
        (2, "203.0.113.9", "10.0.0.2"),  # fewer entries than proxies: REMOTE_ADDR
        (1, "not-an-address", "10.0.0.2"),
        (1, "", "10.0.0.2"),
    ],
)
def test_trusted_proxies(client, middleware, settings, shop, outbox, proxies, forwarded, expected):
    configure(settings, {"trusted_proxies": proxies})
    post(client, shop, REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded)
    assert message(outbox)["context"]["ip"] == expected


# --- cookies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("ajs_anonymous_id", VISITOR),  # Analytics.js 2.0: the raw id
        ("ajs_anonymous_id", segment_classic(VISITOR)),  # Classic: URL-encoded JSON
        ("rl_anonymous_id", rudderstack_v3(VISITOR)),  # RudderStack v3
        ("rl_anonymous_id", rudderstack_legacy(VISITOR)),  # RudderStack v1.1: AES
    ],
    ids=["ajs-2.0", "ajs-classic", "rl-v3", "rl-v1.1"],
)
def test_the_sdk_cookie_formats(client, middleware, settings, shop, outbox, name, value):
    configure(settings)
    post(client, shop, cookies={name: value})
    assert message(outbox)["anonymousId"] == VISITOR


def test_the_documented_v3_example_decodes():
    assert anonymous.decode("RS_ENC_v3_InRlc3QtZGF0YSI=") == "test-data"
    assert anonymous.decode("RS_ENC_v3_InRlc3QtZGF0YSI%3D") == "test-data"


@pytest.mark.parametrize(
    "name, value",
    [
        ("rl_anonymous_id", "RS_ENC_v3_%%%not-base64"),
        ("rl_anonymous_id", "RS_ENC_v3_" + base64.b64encode(b"\xff\xfe").decode()),
        ("rl_anonymous_id", "RS_ENC_v3_" + base64.b64encode(b"42").decode()),  # not a string
        ("rl_anonymous_id", "RudderEncrypt:" + base64.b64encode(b"Salted__" + b"x" * 24).decode()),
        ("rl_anonymous_id", "RudderEncrypt:bm90LXNhbHRlZA=="),
        ("ajs_anonymous_id", "%22unterminated"),
        ("ajs_anonymous_id", quote("a\x00b", safe="")),
        ("ajs_anonymous_id", "x" * 300),
    ],
)
def test_malformed_cookies_are_ignored(client, middleware, settings, shop, outbox, name, value):
    configure(settings)
    post(client, shop, cookies={name: value})
    assert "anonymousId" not in message(outbox)


def test_malformed_headers_are_ignored(client, middleware, settings, shop, outbox):
    configure(settings)
    post(
        client,
        shop,
        HTTP_USER_AGENT="x" * 5000,
        HTTP_ACCEPT_LANGUAGE="<script>",
        HTTP_X_REQUEST_ID="a\x01b",
        REMOTE_ADDR="garbage",
    )
    context = message(outbox)["context"]
    assert not {"ip", "userAgent", "locale", "requestId"} & set(context)


def test_an_untrusted_host_leaves_the_url_out(rf, settings, db):
    from django_cdp.middleware import request_fields

    configure(settings)
    page = request_fields(rf.get("/p/", HTTP_HOST="evil.example"))[0]["page"]
    assert page == {"path": "/p/", "search": "", "referrer": ""}


def test_the_snippets_sdk_decides_the_cookie(client, middleware, settings, shop, outbox):
    frontend = {"WRITE_KEY": "fe", "SDK": "segment", "SDK_URL": "http://127.0.0.1:1/a.js"}
    configure(settings, FRONTEND=frontend)
    post(
        client,
        shop,
        cookies={"rl_anonymous_id": rudderstack_v3("rl-visitor"), "ajs_anonymous_id": VISITOR},
    )
    assert message(outbox)["anonymousId"] == VISITOR
    assert anonymous.cookie_names() == ("ajs_anonymous_id",)


def test_without_cryptography_a_legacy_cookie_is_ignored_with_a_warning(
    client, middleware, settings, shop, outbox, monkeypatch, caplog
):
    configure(settings)
    monkeypatch.setattr(anonymous, "legacy_supported", lambda: False)
    anonymous._warn_unsupported.cache_clear()
    post(client, shop, cookies={"rl_anonymous_id": rudderstack_legacy(VISITOR)})
    assert "anonymousId" not in message(outbox)
    assert "rudderstack-legacy" in caplog.text
    [warning] = [m for m in check_request_context() if m.id == "django_cdp.W004"]
    assert "cryptography" in warning.msg


# --- checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"user_agnet": False}, ["'user_agnet'", "Did you mean 'user_agent'?"]),
        ({"ip": "yes"}, ["['ip'] must be True or False"]),
        ({"trusted_proxies": -1}, ["['trusted_proxies'] must be a whole number"]),
        ({"trusted_proxies": True}, ["['trusted_proxies'] must be a whole number"]),
        ({"request_id_header": 5}, ["['request_id_header'] must be a header name"]),
    ],
)
def test_a_broken_request_context_fails_check_naming_the_key(settings, raw, words):
    configure(settings, raw)
    problems = [m for m in check_request_context() if m.id == "django_cdp.E014"]
    assert len(problems) == 1
    for word in words:
        assert word in problems[0].msg


def test_check_reports_request_context_problems(settings, capsys):
    configure(settings, {"pgae": False})
    with pytest.raises(Exception, match="E014"):
        call_command("check")
