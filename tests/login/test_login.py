"""Identify on login: the owner of the user who logs in is identified, always."""

from __future__ import annotations

import copy
import logging

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client, override_settings

from django_cdp.login import check_login, owner_of
from django_cdp.models import Message
from tests.testapp.models import Member

OWNERS = "tests.login.owners."


def cdp(**overrides):
    config = copy.deepcopy(settings.DJANGO_CDP)
    config.update(overrides)
    return override_settings(DJANGO_CDP=config)


@pytest.fixture
def user(shop):
    user = User.objects.create_user("ann", email=shop.email, password="pw")
    Member.objects.create(user=user, shop=shop)
    return user


def login(username: str = "ann") -> Client:
    client = Client()
    assert client.login(username=username, password="pw")
    return client


def test_login_identifies_the_owner_even_when_its_traits_are_unchanged(outbox, shop, user):
    with cdp(LOGIN={"owner": "member__shop"}):
        login()
        login()
    identifies = outbox.identifies()
    assert [m["userId"] for m in identifies] == [str(shop.pk), str(shop.pk)]
    assert identifies[0]["traits"] == {
        "domain": "acme.example",
        "email": "owner@acme.example",
        "xero_connection_ok": True,
        "plan": "Growth",
    }
    assert outbox.tracks() == []
    assert all(r.violations == [] for r in outbox.rows())


def test_owner_by_function_and_a_signed_in_event(outbox, shop, user):
    with cdp(LOGIN={"owner": OWNERS + "by_email", "track_sign_in": True}):
        login()
    assert [(m["type"], m.get("event"), m["userId"]) for m in outbox.all()] == [
        ("identify", None, str(shop.pk)),
        ("track", "Signed In", str(shop.pk)),
    ]
    assert all(r.violations == [] for r in outbox.rows())  # Signed In is in the plan


def test_nothing_without_login_setting_or_without_an_owner(outbox, shop, user):
    login()  # LOGIN is {} by default
    User.objects.create_user("bob", password="pw")  # no Member row: reverse one-to-one missing
    with cdp(LOGIN={"owner": "member__shop"}):
        login("bob")
        Member.objects.filter(user=user).update(shop=None)
        login("ann")
    assert outbox.rows() == []


def test_a_broken_owner_is_logged_and_the_login_still_works(outbox, shop, user, caplog):
    for owner in ("broken", "wrong_type"):
        with (
            cdp(LOGIN={"owner": OWNERS + owner}),
            caplog.at_level(logging.ERROR, logger="django_cdp"),
        ):
            client = login()
        assert client.get("/admin/").status_code in (200, 302)
        assert int(client.session["_auth_user_id"]) == user.pk
    assert "could not identify the owner of user" in caplog.text
    assert "owner lookup failed" in caplog.text
    assert "not a shops.Shop" in caplog.text
    assert outbox.rows() == []


def test_a_failing_hook_stores_the_login_messages_as_failed_and_the_login_goes_on(
    outbox, shop, user, caplog
):
    hooks = "tests.core.hooks.broken"
    with cdp(LOGIN={"owner": "member__shop", "track_sign_in": True}, ENRICH_MESSAGE=hooks):
        login()  # asserts the login succeeded
    rows = Message.objects.all()
    assert {r.type for r in rows} == {"identify", "track"}
    assert {r.status for r in rows} == {Message.Status.FAILED}
    assert all(r.last_error.endswith("RuntimeError: enrichment failed") for r in rows)


def test_login_identify_in_raise_mode_never_breaks_the_login(outbox, shop, user, caplog):
    with cdp(
        LOGIN={"owner": "member__shop"},
        VALIDATION="raise",
        ENRICH_MESSAGE="tests.validation.hooks.nickname_trait",
    ):
        login()
    assert "Additional-Properties" in caplog.text
    assert outbox.rows() == []


def test_owner_of_self_and_anonymous(shop, user):
    from django.contrib.auth.models import AnonymousUser

    with cdp(LOGIN={"owner": "member__shop"}):
        assert owner_of(user) == shop
        assert owner_of(AnonymousUser()) is None
        assert owner_of(None) is None


# --- check E010 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("login_setting", "fragment"),
    [
        ({"owner": "member__shop", "when": "always"}, "['when'] is not a login option"),
        ({"owner": "member__shop", "track_sign_in": "yes"}, "must be True or False"),
        ({"track_sign_in": True}, "['owner'] is missing"),
        ({"owner": "member"}, "does not lead from the user model auth.User"),
        ({"owner": "groups"}, "does not lead"),
        ({"owner": "member__nope"}, "does not lead"),
        ({"owner": "tests.login.owners.missing"}, "cannot be imported"),
        ({"owner": "tests.login.owners.NOT_CALLABLE"}, "is not callable"),
        ({"owner": "self"}, "the user model is not the identity model"),
    ],
)
def test_a_broken_login_setting_is_e010(login_setting, fragment):
    with cdp(LOGIN=login_setting):
        problems = check_login()
    assert [p.id for p in problems] == ["django_cdp.E010"]
    assert fragment in problems[0].msg


def test_valid_login_settings_pass_the_check():
    for owner in ("member__shop", OWNERS + "by_email"):
        with cdp(LOGIN={"owner": owner, "track_sign_in": True}):
            assert check_login() == []
    assert check_login() == []  # off by default
