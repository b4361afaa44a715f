"""{% cdp_snippet %}: the browser SDK loader, with the backend's userId and nothing more."""

from __future__ import annotations

import copy
import json
import re

import pytest
from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.template import Context, Template
from django.test import RequestFactory, override_settings

from django_cdp.frontend import check_frontend, js_value
from tests.testapp.models import Member

FRONTEND = {
    "WRITE_KEY": "fe-key",
    "DATA_PLANE_URL": "http://127.0.0.1:8089",
    "SDK_URL": "http://127.0.0.1:8089/sdk/rsa.min.js",
}


def cdp(frontend=None, **overrides):
    config = copy.deepcopy(settings.DJANGO_CDP)
    config["FRONTEND"] = {**FRONTEND, **(frontend or {})}
    config["LOGIN"] = {"owner": "member__shop"}
    config.update(overrides)
    return override_settings(DJANGO_CDP=config)


def render(user=None, template="{% load cdp %}{% cdp_snippet %}", **context) -> str:
    request = RequestFactory().get("/")
    request.user = user or AnonymousUser()
    for key, value in context.pop("request_attrs", {}).items():
        setattr(request, key, value)
    return Template(template).render(Context({"request": request, **context}))


def config_of(html: str) -> dict:
    match = re.search(r"var c = (\{.*?\});\n", html)
    assert match, html
    return json.loads(match.group(1))


@pytest.fixture
def user(shop):
    user = User.objects.create_user("ann", password="pw")
    Member.objects.create(user=user, shop=shop)
    return user


def test_nothing_without_a_front_end_write_key(db):
    assert render() == ""  # FRONTEND is {} by default
    with cdp({"WRITE_KEY": ""}):
        assert render() == ""
    with cdp({"SDK_URL": ""}):
        assert render() == ""
    with cdp({"DATA_PLANE_URL": ""}):
        assert render() == ""  # RudderStack needs its data plane


def test_the_backend_write_key_is_never_used(db):
    with cdp({"WRITE_KEY": ""}, WRITE_KEY="server-secret", DATA_PLANE_URL="http://127.0.0.1:1"):
        assert render() == ""


def test_rudderstack_loader_for_an_anonymous_visitor(db):
    with cdp():
        html = render()
    assert html.startswith("<script>(function () {")
    assert html.endswith("})();</script>")
    assert config_of(html) == {
        "writeKey": "fe-key",
        "dataPlaneUrl": "http://127.0.0.1:8089",
        "sdkUrl": "http://127.0.0.1:8089/sdk/rsa.min.js",
        "userId": None,
        "traits": {},
        "page": True,
        "nonce": "",
    }
    assert "ra.load(c.writeKey, c.dataPlaneUrl);" in html
    assert "sdk.getUserId()" in html
    assert "sdk.reset()" in html


def test_identifies_the_owner_with_the_backend_user_id_and_no_traits_by_default(shop, user):
    with cdp():
        data = config_of(render(user))
    assert data["userId"] == str(shop.pk)
    assert data["traits"] == {}


def test_identify_only_when_the_stored_user_id_differs(shop, user):
    with cdp():
        html = render(user)
    assert (
        "if (c.userId !== null && current !== c.userId) { sdk.identify(c.userId, c.traits); }"
        in (html)
    )


def test_only_allowlisted_traits(shop, user):
    with cdp({"TRAITS": ["domain", "plan", "not_a_trait"]}):
        html = render(user)
    assert config_of(html)["traits"] == {"domain": "acme.example", "plan": "Growth"}
    assert "owner@acme.example" not in html
    assert "email" not in html


def test_a_user_without_owner_gets_the_loader_without_identify(db):
    user = User.objects.create_user("bob", password="pw")
    with cdp():
        assert config_of(render(user))["userId"] is None


def test_a_broken_owner_never_breaks_the_page(shop, user, caplog):
    with cdp(LOGIN={"owner": "tests.login.owners.broken"}):
        html = render(user)
    assert config_of(html)["userId"] is None
    assert "could not find the browser identity" in caplog.text


def test_everything_written_into_the_page_is_escaped(shop, user):
    shop.domain = "</script><script>alert(1)</script>&\u2028"
    shop.save()
    evil = '</script><img src=x onerror=alert(1)>"'
    with cdp({"WRITE_KEY": evil, "TRAITS": ["domain"]}):
        html = render(user)
    assert html.count("</script>") == 1  # only the snippet's own closing tag
    assert "<img" not in html
    assert "\\u003C/script\\u003E\\u003Cscript\\u003Ealert(1)" in html
    assert "\\u0026\\u2028" in html
    data = config_of(html)
    assert data["writeKey"] == evil
    assert data["traits"]["domain"] == "</script><script>alert(1)</script>&\u2028"


def test_js_value_escapes_like_json_script():
    assert js_value({"a": "<>&\u2029"}) == '{"a": "\\u003C\\u003E\\u0026\\u2029"}'


def test_nonce_from_the_tag_argument(db):
    with cdp():
        html = render(template="{% load cdp %}{% cdp_snippet nonce=n %}", n="abc123")
    assert html.startswith('<script nonce="abc123">')
    assert config_of(html)["nonce"] == "abc123"  # given to the SDK's own script tag
    assert "s.nonce = c.nonce" in html


def test_nonce_from_the_request_or_context_and_escaped(db):
    with cdp():
        html = render(request_attrs={"csp_nonce": "req-nonce"})
        assert html.startswith('<script nonce="req-nonce">')
        html = render(csp_nonce="ctx-nonce")
        assert html.startswith('<script nonce="ctx-nonce">')
        html = render(template="{% load cdp %}{% cdp_snippet nonce=n %}", n='x"><script>')
        assert html.startswith('<script nonce="x&quot;&gt;&lt;script&gt;">')


def test_segment_analytics_js(shop, user):
    with cdp({"SDK": "segment", "DATA_PLANE_URL": "", "SDK_URL": "http://127.0.0.1:8089/a.js"}):
        html = render(user)
    assert "sdk.user().id()" in html
    assert "analytics.load(c.writeKey);" in html
    assert config_of(html)["userId"] == str(shop.pk)


def test_no_page_call_when_disabled(db):
    with cdp({"PAGE": False}):
        assert config_of(render())["page"] is False


# --- check E011 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frontend", "fragment"),
    [
        ({"KEY": "x"}, "['KEY'] is not a front-end option"),
        ({"SDK": "mixpanel"}, "'mixpanel' is not supported"),
        ({"SDK_URL": ""}, "['SDK_URL'] is empty"),
        ({"DATA_PLANE_URL": ""}, "['DATA_PLANE_URL'] is empty"),
        ({"TRAITS": "domain"}, "must be a list of trait names"),
        ({"TRAITS": ["domain", "password"]}, "'password', which is not an IDENTITY trait"),
        ({"PAGE": "yes"}, "['PAGE'] must be True or False"),
    ],
)
def test_a_broken_frontend_setting_is_e011(frontend, fragment):
    with cdp(frontend):
        problems = check_frontend()
    assert [p.id for p in problems] == ["django_cdp.E011"]
    assert fragment in problems[0].msg


def test_a_valid_frontend_passes_the_check():
    with cdp({"TRAITS": ["domain"]}):
        assert check_frontend() == []
    assert check_frontend() == []


# --- check E012: the server write key in the browser ------------------------------------------


@pytest.mark.parametrize("frontend_key", ["server-secret", " server-secret\n"])
def test_the_server_write_key_in_frontend_is_e012_and_never_rendered(db, frontend_key):
    with cdp({"WRITE_KEY": frontend_key}, WRITE_KEY="server-secret"):
        problems = check_frontend()
        html = render()
    assert [p.id for p in problems] == ["django_cdp.E012"]
    assert "['FRONTEND']['WRITE_KEY'] is the server write key DJANGO_CDP['WRITE_KEY']" in (
        problems[0].msg
    )
    assert "must never reach a browser" in problems[0].hint
    assert "server-secret" not in problems[0].msg + problems[0].hint
    assert html == ""  # refused even when the check is silenced


def test_a_browser_key_of_its_own_passes(db):
    with cdp({"WRITE_KEY": "browser-key"}, WRITE_KEY="server-secret"):
        assert check_frontend() == []
        assert config_of(render())["writeKey"] == "browser-key"
