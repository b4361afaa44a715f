"""The snippet's JavaScript, run in Node against a fake SDK: when it identifies, resets, pages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.snippet.test_snippet import cdp, render, user  # noqa: F401

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the snippet")

HARNESS = r"""
const code = require("fs").readFileSync(0, "utf8");
const stored = process.argv[1] === "null" ? null : process.argv[1];
const sdkName = process.argv[2];
const appended = [];
global.window = {};
global.document = {head: {appendChild: (s) => appended.push(s)}, createElement: () => ({})};
eval(code);
eval(code);  // rendered twice on a page: loads once
const queue = Array.from(window[sdkName]);
const calls = [];
const sdk = {
  getUserId: () => stored,
  user: () => ({id: () => stored}),
  identify: (...a) => calls.push(["identify", ...a]),
  reset: () => calls.push(["reset"]),
  page: () => calls.push(["page"]),
};
window[sdkName] = sdk;
for (const [method, ...args] of queue) { if (method === "ready") args[0](); }
console.log(JSON.stringify({
  queued: queue.map((q) => q[0]), calls, scripts: appended.map((s) => [s.src, s.nonce || null]),
}));
"""


def run(html: str, stored: str | None, sdk: str = "rudderanalytics") -> dict:
    code = re.fullmatch(r"<script[^>]*>(.*)</script>", html, re.S).group(1)
    out = subprocess.run(
        [NODE, "-e", HARNESS, str(stored) if stored is not None else "null", sdk],
        input=code,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(out.stdout)


def test_identifies_when_the_browser_has_another_or_no_user(shop, user):  # noqa: F811
    with cdp({"TRAITS": ["domain"]}):
        html = render(user, template="{% load cdp %}{% cdp_snippet nonce='n1' %}")
    for stored in (None, "someone-else"):
        result = run(html, stored)
        assert result["queued"] == ["load", "ready"]
        assert result["calls"] == [
            ["identify", str(shop.pk), {"domain": "acme.example"}],
            ["page"],
        ]
        assert result["scripts"] == [["http://127.0.0.1:8089/sdk/rsa.min.js", "n1"]]


def test_no_identify_when_the_browser_already_has_the_user(shop, user):  # noqa: F811
    with cdp():
        result = run(render(user), str(shop.pk))
    assert result["calls"] == [["page"]]


def test_reset_when_nobody_is_logged_in_but_the_browser_has_a_user(db):
    with cdp():
        html = render()
    assert run(html, "42")["calls"] == [["reset"], ["page"]]
    assert run(html, None)["calls"] == [["page"]]


def test_segment_snippet(shop, user):  # noqa: F811
    with cdp({"SDK": "segment", "SDK_URL": "http://127.0.0.1:8089/a.js"}):
        html = render(user)
    result = run(html, "other", sdk="analytics")
    assert result["calls"] == [["identify", str(shop.pk), {}], ["page"]]
    assert result["scripts"] == [["http://127.0.0.1:8089/a.js", None]]
    assert run(html, str(shop.pk), sdk="analytics")["calls"] == [["page"]]
