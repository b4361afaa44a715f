"""HTTP transport to a RudderStack or Segment data plane (``POST /v1/batch``).

This module knows the wire format and nothing about the database: it turns
stored payload strings into one request body, posts it, and classifies the
answer. Delivery (``django_cdp.delivery``) decides what each class of answer
means for the rows.

Why it looks the way it does:

* Each outbox row already holds its message as compact JSON, so the body is
  built by string splicing (``sentAt`` is inserted before each message's final
  ``}``) instead of decoding and re-encoding every message.
* Each message carries its own ``sentAt`` because rudder-server ignores
  everything at the top of a batch body except ``batch``; with a per-message
  ``originalTimestamp`` and ``sentAt`` the data plane corrects clock skew.
* One pooled ``requests.Session`` per process, re-created after ``fork()``:
  a session (and its sockets) inherited from a parent process is shared with
  it, which corrupts both (Celery prefork, gunicorn ``--preload``).
* Responses are classified by status code only; rudder-server changed the case
  of its response texts between releases.
* Redirects are never followed: a 3xx means ``DATA_PLANE_URL`` is not the data
  plane's own URL, and following it would send the batch and the write key to
  wherever it points (and count a 200 from a login page as delivered).
* One deadline per request, whatever the server does: requests' timeouts bound
  each socket operation, so a server trickling a byte a second would hold a
  worker (and outlast its lease) for as long as it likes. A timer shuts the
  request's socket down when the deadline passes (:class:`_Deadline`).
* At most :data:`MAX_RESPONSE_BYTES` of a response body are read: only an
  excerpt is kept, and an error page of hundreds of megabytes must not be
  loaded into a worker's memory.
* The write key never appears in logs or stored errors (see :func:`mask`).
"""

from __future__ import annotations

import base64
import email.utils
import enum
import functools
import gzip
import os
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool

import django_cdp

BATCH_PATH = "/v1/batch"
#: Bytes of ``{"batch":[]}`` around the messages.
ENVELOPE_BYTES = len(b'{"batch":[]}')
_SENT_AT_EXAMPLE = "2000-01-01T00:00:00.000Z"
#: Bytes a message grows by on the wire: ``,"sentAt":"…"`` plus the comma between messages.
PER_MESSAGE_OVERHEAD = len(f',"sentAt":"{_SENT_AT_EXAMPLE}"') + 1
#: How much of a response body is kept (it ends up in ``Message.last_error``).
MAX_BODY_CHARS = 2000
#: Bytes of a response body read at most; a longer body's connection is closed unread.
#: They are decoded and masked before the text is cut to ``MAX_BODY_CHARS``, so the
#: window is wide enough to decode to more characters than that whatever the bytes.
MAX_RESPONSE_BYTES = 16 * MAX_BODY_CHARS
USER_AGENT = f"django-cdp/{django_cdp.__version__}"


class Outcome(enum.Enum):
    """What a response means for the messages in the request."""

    #: 2xx: stored by the data plane.
    SENT = "sent"
    #: 429, 5xx, other unexpected codes, timeouts, connection errors: try again later.
    RETRY = "retry"
    #: 400/413: the request was refused for its content; one or more messages are bad.
    REFUSED = "refused"
    #: 3xx, 401/403/404: redirect, bad write key, disabled source or wrong URL; not the
    #: messages' fault.
    CONFIG = "config"


@dataclass(frozen=True)
class Response:
    """The result of one POST, reduced to what delivery needs."""

    #: HTTP status code, or ``None`` when no response arrived (timeout, connection error).
    status: int | None
    #: Response body (truncated), or the masked exception text when there was no response.
    text: str
    #: Seconds asked for by a ``Retry-After`` header, if any.
    retry_after: float | None = None
    #: How long the request took, in milliseconds (until the answer or the failure), so
    #: that a failed attempt shows whether the data plane was slow or quick to refuse.
    duration_ms: int | None = None

    @property
    def outcome(self) -> Outcome:
        return classify(self.status)

    def describe(self) -> str:
        """A one-line description for ``Message.last_error`` and logs."""
        if self.status is None:
            return self.text
        return f"HTTP {self.status}: {self.text}" if self.text else f"HTTP {self.status}"


def classify(status: int | None) -> Outcome:
    """Map a status code (``None``: no response) to an :class:`Outcome`.

    A redirect is a configuration error: the data plane never redirects, so the
    URL points at something else (a load balancer's HTTPS redirect, a login
    page), and no retry will change that until the URL is fixed.
    Codes the API does not document (405, 408, 422, ...) are retried:
    retrying spends attempts and ends in a visible dead letter, whereas
    treating them as refusals would drop messages on a proxy's hiccup.
    """
    if status is None:
        return Outcome.RETRY
    if 200 <= status < 300:
        return Outcome.SENT
    if status in (400, 413):
        return Outcome.REFUSED
    if 300 <= status < 400 or status in (401, 403, 404):
        return Outcome.CONFIG
    return Outcome.RETRY


def wire_size(payload: str) -> int:
    """Bytes ``payload`` takes in a batch body, ``sentAt`` and separator included."""
    size = len(payload) if payload.isascii() else len(payload.encode("utf-8"))
    return size + PER_MESSAGE_OVERHEAD


def is_spliceable(payload: str) -> bool:
    """Whether ``payload`` looks like one compact JSON object (``sentAt`` can be spliced in)."""
    return len(payload) >= 2 and payload[0] == "{" and payload[-1] == "}"


def format_timestamp(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, the form both data planes document."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def build_body(payloads: Sequence[str], sent_at: str) -> bytes:
    """The UTF-8 ``{"batch": [...]}`` body, with ``sentAt`` spliced into every message.

    ``payloads`` must pass :func:`is_spliceable` (delivery checks before claiming
    a send); the messages themselves are copied byte for byte.
    """
    tail = f',"sentAt":"{sent_at}"}}'
    parts = [p[:-1] + (tail[1:] if p[-2] == "{" else tail) for p in payloads]
    return ('{"batch":[' + ",".join(parts) + "]}").encode("utf-8")


def mask(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` (and its Basic-auth form) hidden."""
    if not secret:
        return text
    masked = text.replace(secret, "***")
    return masked.replace(_basic_token(secret), "***")


def _basic_token(write_key: str) -> str:
    return base64.b64encode(f"{write_key}:".encode()).decode("ascii")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (seconds or HTTP date), else ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _Deadline:
    """Ends one request at a fixed time, whichever phase it is in.

    A ``threading.Timer`` shuts the request's socket down when the time is up, so
    a blocked send or read fails at once instead of waiting for bytes that a
    trickling server hands out just often enough to beat every per-operation
    timeout. A connect has no socket to shut down yet; its own timeout is never
    longer than the deadline, and the connection registers itself
    (:meth:`attach`) when the request starts and again once connected, so a
    deadline that passed meanwhile ends the request right there.
    """

    _local = threading.local()

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._connection: Any = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _Deadline._local.current = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        _Deadline._local.current = None

    def stop(self) -> bool:
        """Disarm (the connection may go back to the pool); whether the deadline had passed."""
        with self._lock:
            self._timer.cancel()
            self._connection = None
            return self.expired

    @classmethod
    def attach(cls, connection: Any) -> None:
        """Called by a connection of ours: put it under this thread's deadline, if any."""
        deadline: _Deadline | None = getattr(cls._local, "current", None)
        if deadline is None:
            return
        with deadline._lock:
            deadline._connection = connection
            if deadline.expired:
                _shutdown(connection)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            _shutdown(self._connection)


def _shutdown(connection: Any) -> None:
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with suppress(OSError):  # not connected (yet), or already closed
            sock.shutdown(socket.SHUT_RDWR)


class _DeadlineConnection:
    """Mixed into urllib3's connection classes: registers with the request's :class:`_Deadline`."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        _Deadline.attach(self)
        super().request(*args, **kwargs)  # type: ignore[misc]

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _Deadline.attach(self)


@functools.cache
def _deadline_pool(pool_cls: type[HTTPConnectionPool]) -> type[HTTPConnectionPool]:
    """``pool_cls`` with connections that obey :class:`_Deadline`."""
    conn_cls = pool_cls.ConnectionCls
    connection = type(conn_cls.__name__, (_DeadlineConnection, conn_cls), {})
    return type(pool_cls.__name__, (pool_cls,), {"ConnectionCls": connection})


class _Adapter(HTTPAdapter):
    """An adapter whose pools (direct or through a proxy) enforce :class:`_Deadline`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _use_deadline_pools(self.poolmanager)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(*args, **kwargs)
        _use_deadline_pools(manager)
        return manager


def _use_deadline_pools(manager: Any) -> None:
    manager.pool_classes_by_scheme = {
        scheme: _deadline_pool(cls) for scheme, cls in manager.pool_classes_by_scheme.items()
    }


# One session per process. ``os.register_at_fork`` drops it in children; the PID
# check covers processes created without fork hooks (e.g. by C extensions).
_session_lock = threading.Lock()
_session: requests.Session | None = None
_session_pid: int | None = None


def _new_session() -> requests.Session:
    session = requests.Session()
    # No urllib3-level retries: every retry decision is made (and recorded) by delivery.
    adapter = _Adapter(pool_connections=4, pool_maxsize=8, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    # The body is read raw (capped); a compressed error page could inflate without bound.
    session.headers["Accept-Encoding"] = "identity"
    return session


def get_session() -> requests.Session:
    """This process's pooled session (created on first use, and again after a fork)."""
    global _session, _session_pid
    pid = os.getpid()
    if _session is None or _session_pid != pid:
        with _session_lock:
            if _session is None or _session_pid != pid:
                _session = _new_session()
                _session_pid = pid
    return _session


def _forget_session_after_fork() -> None:
    # Do not close it: its sockets belong to the parent too.
    global _session, _session_pid, _session_lock
    _session = None
    _session_pid = None
    _session_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_session_after_fork)


def post_batch(
    payloads: Sequence[str],
    *,
    write_key: str,
    data_plane_url: str,
    use_gzip: bool = True,
    connect_timeout: float = 5.0,
    read_timeout: float = 15.0,
    total_timeout: float | None = None,
    sent_at: str | None = None,
) -> Response:
    """POST ``payloads`` as one batch and return the classified-ready :class:`Response`.

    The whole request (connect, send, answer, body) ends within ``total_timeout``
    seconds (default ``connect_timeout + read_timeout``); without a status code by
    then it is a timeout. A body still arriving then is cut, the status stands.
    Never raises for network problems: they come back as ``status=None`` with a
    masked description, because for delivery they are just another outcome.
    """
    body = build_body(payloads, sent_at or format_timestamp())
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Basic " + _basic_token(write_key),
    }
    if use_gzip:
        # Level 1: JSON compresses ~10x even at the fastest level, and CPU is the bottleneck.
        body = gzip.compress(body, compresslevel=1, mtime=0)
        headers["Content-Encoding"] = "gzip"
    url = data_plane_url.rstrip("/") + BATCH_PATH
    total = connect_timeout + read_timeout if total_timeout is None else total_timeout
    started = time.monotonic()
    with _Deadline(total) as deadline:
        try:
            resp = get_session().post(
                url,
                data=body,
                headers=headers,
                timeout=(min(connect_timeout, total), min(read_timeout, total)),
                allow_redirects=False,
                stream=True,
            )
        except requests.RequestException as exc:
            if deadline.expired:
                text = f"timeout: no answer within the request's deadline of {total:.3g} s"
            else:
                kind = "timeout" if isinstance(exc, requests.Timeout) else "connection error"
                text = f"{kind}: {type(exc).__name__}: {exc}"
            return Response(None, mask(text, write_key), duration_ms=_elapsed_ms(started))
        raw = _read_body(resp, deadline)
    if 300 <= resp.status_code < 400:
        text = (
            f"redirected ({resp.status_code}) to {resp.headers.get('Location', '(no Location)')}: "
            "DATA_PLANE_URL must be the data plane's own URL"
        )
    else:
        text = raw.decode("utf-8", "replace")
    # Mask before truncating, so that a key cut in two at the limit cannot leak half
    # (MAX_RESPONSE_BYTES decodes to far more than MAX_BODY_CHARS characters).
    return Response(
        resp.status_code,
        mask(text, write_key)[:MAX_BODY_CHARS].strip(),
        parse_retry_after(resp.headers.get("Retry-After")),
        duration_ms=_elapsed_ms(started),
    )


def _read_body(resp: requests.Response, deadline: _Deadline) -> bytes:
    """At most :data:`MAX_RESPONSE_BYTES` of the body, read as it arrives, undecoded.

    The connection goes back to the pool only when the body was read to its end
    in time; otherwise it is closed, unread rest and all.
    """
    data = bytearray()
    complete = False
    try:
        while len(data) < MAX_RESPONSE_BYTES:
            chunk = resp.raw.read1(MAX_RESPONSE_BYTES - len(data), decode_content=False)
            if not chunk:
                complete = True
                break
            data += chunk
    except (urllib3.exceptions.HTTPError, OSError):
        pass  # the deadline or the server cut the body: the status has arrived, keep it
    if not deadline.stop() and complete:
        resp.raw.release_conn()
    else:
        resp.close()
    return bytes(data)


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
