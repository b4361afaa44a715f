"""The HTTP transport on its own: body format, gzip, auth, masking, classification."""

from __future__ import annotations

import base64
import gzip
import json
import os

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
        (302, Outcome.RETRY),
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
