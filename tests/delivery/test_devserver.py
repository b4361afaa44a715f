"""The local data plane answers like rudder-server's gateway."""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import socket
import threading
import time
import tracemalloc
import zlib

import pytest
import requests
from django.core.management import call_command
from django.core.management.base import CommandError

from django_cdp.devserver import DataPlaneServer, format_message
from tests.delivery.conftest import WRITE_KEY

AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
GOOD = {"type": "track", "userId": "1", "event": "Paid", "messageId": "m1"}


@pytest.fixture
def server():
    out = io.StringIO()
    server = DataPlaneServer(write_key=WRITE_KEY, out=out).start()
    server.printed = out
    yield server
    server.stop()


def post(server, body, *, path="/v1/batch", headers=AUTH, raw=False):
    data = body if raw else json.dumps(body).encode()
    return requests.post(server.url + path, data=data, headers=headers, timeout=5)


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"batch": [GOOD]}, 200, "ok"),
        ({"batch": []}, 400, "empty batch payload"),
        ({"sentAt": "x"}, 400, "empty batch payload"),
        ({"batch": [GOOD, "nope"]}, 400, "event is not a valid rudder event"),
        ({"batch": [{**GOOD, "type": ""}]}, 400, "event is not a valid rudder event"),
        ({"batch": [GOOD, {"type": "track", "userId": " "}]}, 400, "request neither has"),
        ({"batch": [{"type": "track", "anonymousId": "a"}]}, 200, "ok"),
    ],
)
def test_batch_checks(server, body, status, text):
    resp = post(server, body)
    assert resp.status_code == status and resp.text.startswith(text)
    assert len(server.messages) == (len(body["batch"]) if status == 200 else 0)


def test_auth_json_gzip_and_size(server):
    assert post(server, {"batch": [GOOD]}, headers={}).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"other:").decode()}
    assert post(server, {"batch": [GOOD]}, headers=wrong).text == "invalid write key\n"
    assert post(server, b"{not json", raw=True).status_code == 400
    zipped = gzip.compress(json.dumps({"batch": [GOOD]}).encode())
    headers = {**AUTH, "Content-Encoding": "gzip"}
    assert post(server, zipped, raw=True, headers=headers).status_code == 200
    assert post(server, b"garbage", raw=True, headers=headers).status_code == 500
    big = {"batch": [{**GOOD, "properties": {"x": "y" * 4_100_000}}]}
    assert (
        post(server, gzip.compress(json.dumps(big).encode()), raw=True, headers=headers).status_code
        == 413
    )
    assert server.requests[-1].body_bytes > 4_096_000


def _raw_post(server, head: bytes, body: bytes = b"") -> bytes:
    """Send a hand-made request; the answer's status line and headers."""
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        return answer


def test_content_length_is_checked_before_the_body_is_read(server, caplog):
    auth = AUTH["Authorization"].encode()
    head = b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
    with caplog.at_level(logging.WARNING, "django_cdp.devserver"):
        # 5 MB announced, a few bytes sent: answered at once, nothing waited for.
        answer = _raw_post(server, head + b"\r\nContent-Length: 5000000", b"{}")
        assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
        chunked = requests.post(
            server.url + "/v1/batch", data=iter([b'{"batch":[]}']), headers=AUTH, timeout=5
        )
        assert (chunked.status_code, chunked.text) == (411, "length required\n")
    assert [(r.status, r.body_bytes) for r in server.requests] == [(413, 5_000_000), (411, 0)]
    assert "refused POST /v1/batch with 413 request size exceeds max limit" in caplog.text
    assert "refused POST /v1/batch with 411 length required" in caplog.text


def test_a_gzip_bomb_is_not_inflated(server, caplog):
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    bomb = b"".join(deflater.compress(zeros) for _ in range(300)) + deflater.flush()
    assert len(bomb) < 400_000  # 300 MB inflated
    tracemalloc.start()
    try:
        resp = post(server, bomb, raw=True, headers={**AUTH, "Content-Encoding": "gzip"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (resp.status_code, resp.text) == (413, "request size exceeds max limit\n")
    assert peak < 4 * server.max_request_bytes
    assert server.requests[-1].body_bytes == server.max_request_bytes + 1


def test_gzip_members_and_truncation(server):
    headers = {**AUTH, "Content-Encoding": "gzip"}
    body = json.dumps({"batch": [GOOD]}).encode()
    two_members = gzip.compress(body[:10]) + gzip.compress(body[10:])
    assert post(server, two_members, raw=True, headers=headers).status_code == 200
    truncated = gzip.compress(body)[:-12]
    assert post(server, truncated, raw=True, headers=headers).status_code == 500


def test_single_message_endpoints_take_the_type_from_the_path(server):
    resp = post(server, {**GOOD, "type": "whatever"}, path="/v1/identify")
    assert resp.status_code == 200 and server.messages[0]["type"] == "identify"
    assert post(server, {"batch": [GOOD]}, path="/v1/nope").status_code == 404


def test_prints_one_line_per_message(server):
    post(server, {"batch": [GOOD, {**GOOD, "messageId": "m2", "properties": {"a": 1}}]})
    lines = server.printed.getvalue().splitlines()
    assert len(lines) == 2 and '"Paid"' in lines[1] and "userId=1" in lines[1]
    assert json.loads(format_message(GOOD, as_json=True)) == GOOD


def test_fault_injection(server):
    server.status_sequence.extend([503, 429])
    server.retry_after = "3"
    assert post(server, {"batch": [GOOD]}).status_code == 503
    resp = post(server, {"batch": [GOOD]})
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "3"
    server.reject_message_ids.add("m1")
    assert post(server, {"batch": [GOOD]}).status_code == 400
    assert server.messages == []
    server.reject_message_ids.clear()
    server.delay = 0.3
    started = time.monotonic()
    assert post(server, {"batch": [GOOD]}).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_hang_until_released(server):
    server.hang.set()
    with pytest.raises(requests.Timeout):
        requests.post(server.url + "/v1/batch", json={"batch": [GOOD]}, headers=AUTH, timeout=0.3)
    server.hang.clear()
    assert server.messages == []  # a hung request is never stored


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cdp_devserver_command_serves_until_interrupted():
    port = _free_port()
    out = io.StringIO()

    def run():
        try:
            call_command("cdp_devserver", "--port", str(port), "--write-key", WRITE_KEY, stdout=out)
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            out.write(f"ERROR {exc}")

    from django_cdp.management.commands import cdp_devserver

    servers = []
    original = cdp_devserver.DataPlaneServer

    class Recorded(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    cdp_devserver.DataPlaneServer = Recorded
    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 5
        while not servers and time.monotonic() < deadline:
            time.sleep(0.02)
        resp = requests.post(
            f"http://127.0.0.1:{port}/v1/batch", json={"batch": [GOOD]}, headers=AUTH, timeout=5
        )
        assert resp.status_code == 200
        servers[0].shutdown()
        thread.join(5)
    finally:
        cdp_devserver.DataPlaneServer = original
    text = out.getvalue()
    assert f"http://127.0.0.1:{port}" in text and WRITE_KEY not in text
    assert '"Paid"' in text


def test_cdp_devserver_refuses_a_port_in_use():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(CommandError):
            call_command("cdp_devserver", "--port", str(sock.getsockname()[1]))
