"""A local data plane: the RudderStack HTTP API on localhost, for development and tests.

``manage.py cdp_devserver`` runs it so that a team can watch its messages
arrive before it has an account. It checks requests the way rudder-server's
gateway does (Basic auth, gzip, body size after decompression, JSON, a
non-empty ``batch``, every item an object with ``type`` and ``userId`` or
``anonymousId``; one bad item refuses the whole request) and answers with the
same status codes and lower-case texts, so what passes here passes there.

It never holds more than the size limit of one body in memory, whatever a
client sends: the ``Content-Length`` is checked before the body is read (none:
411, over the limit: 413), and gzip is inflated incrementally and stopped just
past the limit (413), so a small gzip bomb cannot inflate to gigabytes. Every
refused request is logged (logger ``django_cdp.devserver``) with its reason.

:class:`DataPlaneServer` is also the data plane of django-cdp's own tests:
start it on port 0 in a thread, read what it received from ``messages`` and
``requests``, and inject faults (a sequence of status codes, ``Retry-After``,
a delay or a hang, refusal of given messageIds).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import TextIOBase
from typing import Any, TextIO

#: rudder-server ``Gateway.maxReqSizeInKB`` (4000 KiB), measured after decompression.
MAX_REQUEST_BYTES = 4_096_000
#: Bytes of a refused, unread body read and thrown away after the answer (Go's net/http
#: does the same, 256 KiB), for at most ``DISCARD_SECONDS``: a client still sending its
#: body then reads the answer instead of a reset connection. The connection is closed after.
DISCARD_BYTES = 256 * 1024
DISCARD_SECONDS = 1.0
_CHUNK = 64 * 1024
SINGLE_MESSAGE_PATHS = {
    f"/v1/{kind}": kind for kind in ("identify", "track", "page", "screen", "group", "alias")
}
BATCH_PATH = "/v1/batch"

logger = logging.getLogger("django_cdp.devserver")


@dataclass
class ReceivedRequest:
    """One request as the server saw it (kept for every request, accepted or not)."""

    path: str
    status: int
    #: Monotonic time the request arrived.
    at: float
    headers: dict[str, str]
    #: messageIds of the items in the body (empty when the body was unreadable).
    message_ids: list[str] = field(default_factory=list)
    #: Size of the body after decompression, as far as it was read: ``max_request_bytes + 1``
    #: for one inflating past the limit, the declared length for one refused on it.
    body_bytes: int = 0


class _Handler(BaseHTTPRequestHandler):
    server: DataPlaneServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's
    # algorithm and the client's delayed ACK add ~40 ms to every answer.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the server prints messages, not access logs

    def do_GET(self) -> None:
        if self.path in ("/", "/health"):
            self._answer(200, '{"server":"UP","db":"UP"}', content_type="application/json")
        elif self.path == "/version":
            self._answer(200, '{"Version":"django-cdp devserver"}', "application/json")
        else:
            self._answer(404, "404 page not found")

    def do_POST(self) -> None:
        self.server.handle_post(self)

    def _answer(
        self,
        status: int,
        text: str,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        body = (text + "\n").encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client went away (timeout, killed worker)


class DataPlaneServer(ThreadingHTTPServer):
    """A threaded loopback data plane with a record of what it received.

    Fault injection (set the attributes at any time; they are read per request):

    * ``status_sequence``: status codes answered, one per request, before any
      check, until the sequence is used up (the messages are not stored);
    * ``retry_after``: ``Retry-After`` header value sent with those answers;
    * ``delay``: seconds to wait before answering (after storing, like a slow
      gateway that has committed but not yet answered);
    * ``hang``: while set, requests wait (unstored) until it is cleared or the
      server stops;
    * ``reject_message_ids``: a request holding any of these messageIds is
      answered 400, as rudder-server does for one bad item.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        write_key: str | None = None,
        out: TextIO | TextIOBase | None = None,
        print_json: bool = False,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.write_key = write_key
        self.out = out
        self.print_json = print_json
        self.max_request_bytes = max_request_bytes
        self.lock = threading.Lock()
        self.messages: list[dict[str, Any]] = []
        self.requests: list[ReceivedRequest] = []
        self.status_sequence: deque[int] = deque()
        self.retry_after: str | None = None
        self.delay = 0.0
        self.hang = threading.Event()
        self.reject_message_ids: set[str] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # Lifecycle.

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]  # server_address, typed for any family
        return f"http://{host}:{port}"

    def start(self) -> DataPlaneServer:
        """Serve in a daemon thread; returns ``self``."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="cdp-devserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.hang.clear()
        self.shutdown()
        self.server_close()

    # Records.

    def message_ids(self) -> list[str]:
        with self.lock:
            return [str(m.get("messageId")) for m in self.messages]

    def wait_for(self, count: int, timeout: float = 20.0) -> bool:
        """Wait until at least ``count`` messages are stored; whether they were."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return True
            time.sleep(0.02)
        return False

    def reset(self) -> None:
        with self.lock:
            self.messages.clear()
            self.requests.clear()

    # The gateway.

    def handle_post(self, handler: _Handler) -> None:
        arrived = time.monotonic()
        headers = {k.lower(): v for k, v in handler.headers.items()}
        length, refusal = self._content_length(headers)
        extra: dict[str, str] = {}
        if refusal is None:
            status, text, items, size = self._check(
                handler.path, headers, handler.rfile.read(length)
            )
        else:
            (status, text), items, size = refusal, [], length
            extra["Connection"] = "close"
        with self.lock:
            if self.status_sequence:
                status, text = self.status_sequence.popleft(), "injected fault"
                if self.retry_after is not None:
                    extra["Retry-After"] = self.retry_after
            elif status == 200 and any(
                str(i.get("messageId")) in self.reject_message_ids for i in items
            ):
                status, text = 400, "request neither has anonymousId nor userId"
            record = ReceivedRequest(
                handler.path,
                status,
                arrived,
                headers,
                [str(i.get("messageId")) for i in items if isinstance(i, dict)],
                size,
            )
            self.requests.append(record)
        if status != 200:
            logger.warning(
                "devserver: refused POST %s with %d %s (%d bytes)", handler.path, status, text, size
            )
        if self.hang.is_set():
            # A hung gateway: the request waits, then ends without an answer or a record.
            while self.hang.is_set() and not self._stopped.is_set():
                time.sleep(0.05)
            return
        if status == 200:
            with self.lock:
                self.messages.extend(items)
            self.received(items)
        if self.delay:
            time.sleep(self.delay)
        handler._answer(status, text, headers=extra)
        if refusal is not None:
            _discard(handler, length)

    def _content_length(self, headers: dict[str, str]) -> tuple[int, tuple[int, str] | None]:
        """The body's declared length, and the refusal (status, text) it earns, if any.

        Checked before anything is read, so that a client cannot make the server
        allocate more than the limit (a compressed body over the limit would
        inflate to more still).
        """
        value = headers.get("content-length")
        if value is None:
            return 0, (411, "length required")
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            return 0, (400, "invalid content length")
        if length > self.max_request_bytes:
            return length, (413, "request size exceeds max limit")
        return length, None

    def _check(
        self, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, str, list[dict[str, Any]], int]:
        """Check a request in rudder-server's order: (status, text, items, body size).

        Path, then auth, then decompression, then size, then the JSON body.
        """
        single = SINGLE_MESSAGE_PATHS.get(path)
        if path != BATCH_PATH and single is None:
            return 404, "404 page not found", [], 0
        if not self._authorized(headers.get("authorization", "")):
            return 401, "invalid write key", [], 0
        if headers.get("content-encoding", "").lower() == "gzip":
            try:
                raw = _gunzip(raw, self.max_request_bytes)
            except (EOFError, zlib.error):
                return 500, "failed to read body from request", [], 0
        if len(raw) > self.max_request_bytes:
            return 413, "request size exceeds max limit", [], len(raw)
        return (*self._validate(single, raw), len(raw))

    def _validate(self, single: str | None, raw: bytes) -> tuple[int, str, list[dict[str, Any]]]:
        if not raw:
            return 400, "request body is nil", []
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, "invalid json", []
        if single is not None:
            if not isinstance(body, dict):
                return 400, "event is not a valid rudder event", []
            items: Any = [{**body, "type": single}]
        else:
            items = body.get("batch") if isinstance(body, dict) else None
            if not items or not isinstance(items, list):
                return 400, "empty batch payload", []
        for item in items:
            if not isinstance(item, dict) or not item.get("type"):
                return 400, "event is not a valid rudder event", []
        for item in items:
            if not _has_id(item.get("userId")) and not _has_id(item.get("anonymousId")):
                return 400, "request neither has anonymousId nor userId", items
        return 200, "ok", items

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            user = base64.b64decode(token, validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(user) and (self.write_key is None or user == self.write_key)

    def received(self, items: list[dict[str, Any]]) -> None:
        """Called with the messages of every accepted request: prints them (override to record)."""
        if self.out is None:
            return
        lines = [format_message(i, as_json=self.print_json) for i in items]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def _gunzip(data: bytes, limit: int) -> bytes:
    """``data`` (one or more gzip members) inflated, stopping at ``limit + 1`` bytes.

    A result longer than ``limit`` means "over the limit"; inflating stops there
    instead of expanding a gzip bomb in memory. Raises ``EOFError`` for a
    truncated body and ``zlib.error`` for a corrupt one.
    """
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            break
        if not inflater.eof:
            raise EOFError("truncated gzip body")
        data = inflater.unused_data
    return bytes(out)


def _discard(handler: _Handler, length: int) -> None:
    """Read and drop up to :data:`DISCARD_BYTES` of an unread body, a chunk at a time."""
    left = min(length, DISCARD_BYTES)
    handler.connection.settimeout(DISCARD_SECONDS)
    try:
        while left > 0:
            chunk = handler.rfile.read1(min(left, _CHUNK))
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        pass  # the client stopped sending or went away; the connection is closed anyway


def _has_id(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


def format_message(message: dict[str, Any], *, as_json: bool = False) -> str:
    """One readable line per message (or its full JSON)."""
    if as_json:
        return json.dumps(message, sort_keys=True, default=str)
    kind = message.get("type", "?")
    name = message.get("event") if kind == "track" else None
    who = (
        f"userId={message['userId']}"
        if _has_id(message.get("userId"))
        else f"anonymousId={message.get('anonymousId')}"
    )
    data = message.get("properties") if kind == "track" else message.get("traits")
    if data is None and kind == "identify":
        data = (message.get("context") or {}).get("traits")
    summary = json.dumps(data, sort_keys=True, default=str) if data else ""
    if len(summary) > 160:
        summary = summary[:157] + "..."
    stamp = datetime.now().strftime("%H:%M:%S")
    parts = [stamp, f"{kind:<8}", f'"{name}"' if name else "", who, summary]
    parts.append(f"messageId={message.get('messageId')}")
    return "  ".join(p for p in parts if p)
