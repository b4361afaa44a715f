"""The HTTP transport on its own: body format, gzip, auth, masking, classification."""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from django_cdp import transport
from django_cdp.devserver import DataPlaneServer
from django_cdp.transport import Outcome
from tests.delivery.conftest import WRITE_KEY

PAYLOADS = [
    '{"type":"track","userId":"1","messageId":"m1","event":"Paid","properties":{"amount":1.5}}',
    '{"type":"identify","userId":"2","messageId":"m2","traits":{"name":"Zoë"}}',
]


def test_body_splices_sent_at_into_every_message_without_reencoding():
    body = transport.build_body(PAYLOADS, "2024-05-01T10:00:00.123Z")
    batch = json.loads(body)["batch"]
    assert [m["sentAt"] for m in batch] == ["2024-05-01T10:00:00.123Z"] * 2
    assert [m["messageId"] for m in batch] == ["m1", "m2"]
    # The stored text is copied byte for byte (non-ASCII included).
    assert PAYLOADS[1][:-1].encode() in body
    assert json.loads(transport.build_body(["{}"], "x")) == {"batch": [{"sentAt": "x"}]}


def test_wire_size_is_exactly_what_the_body_uses():
    sent_at = transport.format_timestamp()
    body = transport.build_body(PAYLOADS, sent_at)
    assert len(body) == transport.ENVELOPE_BYTES + sum(map(transport.wire_size, PAYLOADS)) - 1


def test_timestamp_format():
    stamp = transport.format_timestamp()
    assert len(stamp) == 24 and stamp.endswith("Z") and stamp[19] == "."


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SENT),
        (204, Outcome.SENT),
        (400, Outcome.REFUSED),
        (413, Outcome.REFUSED),
        (401, Outcome.CONFIG),
        (403, Outcome.CONFIG),
        (404, Outcome.CONFIG),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (301, Outcome.CONFIG),
        (302, Outcome.CONFIG),
        (307, Outcome.CONFIG),
        (308, Outcome.CONFIG),
        (None, Outcome.RETRY),
    ],
)
def test_classification_by_status_code_only(status, outcome):
    assert transport.classify(status) is outcome


def test_retry_after_parsing():
    assert transport.parse_retry_after("7") == 7.0
    assert transport.parse_retry_after(None) is None
    assert transport.parse_retry_after("soon") is None
    assert transport.parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT") > 3600
    assert transport.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_mask_hides_key_and_basic_token():
    token = base64.b64encode(b"secret:").decode()
    assert transport.mask(f"key secret in {token}", "secret") == "key *** in ***"
    assert transport.mask("anything", "") == "anything"


@pytest.fixture
def server():
    server = DataPlaneServer(write_key=WRITE_KEY).start()
    yield server
    server.stop()


def _post(server, **kwargs):
    options = {"write_key": WRITE_KEY, "data_plane_url": server.url, **kwargs}
    return transport.post_batch(PAYLOADS, **options)


def test_post_gzip_basic_auth_and_json(server):
    resp = _post(server)
    assert (resp.status, resp.text, resp.outcome) == (200, "ok", Outcome.SENT)
    request = server.requests[0]
    assert request.path == "/v1/batch"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["content-type"] == "application/json"
    assert (
        request.headers["authorization"]
        == "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    )
    assert request.headers["user-agent"].startswith("django-cdp/")
    assert server.message_ids() == ["m1", "m2"]


def test_post_without_gzip(server):
    assert _post(server, use_gzip=False).status == 200
    assert "content-encoding" not in server.requests[0].headers


def test_wrong_key_is_a_config_error_and_never_echoed(server):
    resp = _post(server, write_key="wrong-key-123")
    assert (resp.status, resp.outcome) == (401, Outcome.CONFIG)
    assert "wrong-key-123" not in resp.describe()


def test_connection_error_is_masked_and_retryable():
    resp = transport.post_batch(
        PAYLOADS,
        write_key="supersecret",
        data_plane_url="http://supersecret@127.0.0.1:9",
        connect_timeout=1,
        read_timeout=1,
    )
    assert resp.status is None and resp.outcome is Outcome.RETRY
    assert "supersecret" not in resp.describe()
    assert resp.describe().startswith("connection error")


def test_read_timeout(server):
    server.hang.set()
    resp = _post(server, read_timeout=0.3)
    assert resp.status is None and resp.describe().startswith("timeout")


def test_session_is_per_process():
    session = transport.get_session()
    assert transport.get_session() is session
    pid = os.fork()
    if pid == 0:  # child: a fresh session, not the parent's sockets
        os._exit(0 if transport.get_session() is not session else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_gzip_body_decompresses_to_the_batch():
    body = transport.build_body(PAYLOADS, "t")
    assert gzip.decompress(gzip.compress(body, compresslevel=1)) == body


# --- misbehaving servers ---------------------------------------------------------------------


class ScriptedServer:
    """A loopback HTTP server whose answer is a script writing raw bytes to the socket.

    It reads each request (headers and ``Content-Length`` body), runs ``script(conn)``,
    then waits for the client to close the connection and sets ``client_gone``.
    ``sent`` counts the bytes the script managed to write.
    """

    def __init__(self, script: Callable[[ScriptedServer, socket.socket], None]) -> None:
        self.script = script
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self.sent = 0
        self.client_gone = threading.Event()
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            try:
                self.script(self, conn)
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            self.client_gone.set()

    def write(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def trickle(self, conn: socket.socket, data: bytes, every: float = 0.2) -> None:
        """One byte every ``every`` seconds (each far inside any per-read timeout)."""
        for i in range(len(data)):
            if self.stopped.wait(every):
                return
            self.write(conn, data[i : i + 1])

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Callable[[ScriptedServer, socket.socket], None]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"


def _timed_post(url: str, **kwargs) -> tuple[transport.Response, float]:
    options = {"write_key": WRITE_KEY, "data_plane_url": url, **kwargs}
    started = time.monotonic()
    resp = transport.post_batch(PAYLOADS, **options)
    return resp, time.monotonic() - started


def test_redirect_is_not_followed_and_is_a_config_error(server, scripted):
    target = server.url + f"/login?key={WRITE_KEY}"
    redirector = scripted(
        lambda srv, conn: srv.write(
            conn,
            f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode(),
        )
    )
    resp = _post_to(redirector.url)
    assert (resp.status, resp.outcome) == (302, Outcome.CONFIG)
    assert server.requests == []  # neither the batch nor the write key went to the target
    assert resp.describe() == (
        f"HTTP 302: redirected (302) to {server.url}/login?key=***: "
        "DATA_PLANE_URL must be the data plane's own URL"
    )


def _post_to(url: str, **kwargs) -> transport.Response:
    return _timed_post(url, **kwargs)[0]


def test_trickled_answer_is_cut_at_the_requests_deadline(scripted):
    # Status line and headers one byte per 0.2 s: every read succeeds within the 1 s read
    # timeout, so only a deadline for the whole request ends it.
    slow = scripted(lambda srv, conn: srv.trickle(conn, OK_HEAD % 2 + b"ok"))
    resp, took = _timed_post(slow.url, connect_timeout=1.0, read_timeout=1.0)
    assert resp.status is None and resp.outcome is Outcome.RETRY
    assert resp.describe() == "timeout: no answer within the request's deadline of 2 s"
    assert 1.9 < took < 2.5
    assert slow.client_gone.wait(1)  # the connection was closed, not left hanging


def test_trickled_body_is_cut_at_the_deadline_and_the_status_stands(scripted):
    def script(srv: ScriptedServer, conn: socket.socket) -> None:
        srv.write(conn, OK_HEAD % 100 + b"o")
        srv.trickle(conn, b"k" * 99)

    slow = scripted(script)
    resp, took = _timed_post(slow.url, connect_timeout=0.5, read_timeout=1.0, total_timeout=1.2)
    assert (resp.status, resp.outcome) == (200, Outcome.SENT)
    assert resp.text.startswith("okkk") and len(resp.text) < 100
    assert 1.1 < took < 1.7


def test_a_huge_body_is_not_read(scripted):
    size = 300 * 1024 * 1024

    def script(srv: ScriptedServer, conn: socket.socket) -> None:
        srv.write(conn, b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        while srv.sent < size:
            srv.write(conn, chunk)

    big = scripted(script)
    resp = _post_to(big.url)
    assert (resp.status, len(resp.text)) == (500, transport.MAX_BODY_CHARS)
    assert big.client_gone.wait(5)
    # What the server could write before the client closed: socket buffers, not 300 MB.
    assert big.sent < 20 * 1024 * 1024


def test_connections_are_reused_when_the_body_was_read(server):
    accepted = []
    real = server.get_request

    def get_request():
        accepted.append(1)
        return real()

    server.get_request = get_request
    transport.get_session().close()  # forget connections of earlier tests
    for _ in range(3):
        assert _post(server).status == 200
    assert len(accepted) == 1
