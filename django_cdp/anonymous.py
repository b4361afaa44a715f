"""The browser's ``anonymousId``, read from the cookie its analytics SDK keeps.

A server event that carries the browser's current anonymous id next to the
owner's ``userId`` joins the visit that caused it to the customer: funnels
stitch. The SDKs store the id in a first-party cookie on the site's top
domain, so it reaches Django with every request of the same site:

* Segment's analytics.js, ``ajs_anonymous_id``: the raw id (Analytics.js 2.0),
  or a URL-encoded JSON string, ``%22<id>%22`` (Analytics.js Classic);
* RudderStack's JavaScript SDK, ``rl_anonymous_id``: ``RS_ENC_v3_`` + base64
  of the JSON string (v3, the default), or ``RudderEncrypt:`` + AES of it with
  the SDK's public passphrase ``Rudder`` (v1.1; OpenSSL's salted format, key
  and IV from ``EVP_BytesToKey`` with MD5). Both are URL-encoded. The AES form
  is decrypted with the ``cryptography`` package (the ``rudderstack-legacy``
  extra); without it such a cookie is ignored, with one warning in the log.

The cookie is the visitor's to write: a value that does not decode, or decodes
to anything but a short printable string, is ignored, never an error. The
``{% cdp_snippet %}`` loads the SDK of ``FRONTEND["SDK"]``, and the middleware
reads that SDK's cookie (both cookies when no front end is configured).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.util
import json
import logging
from collections.abc import Mapping
from urllib.parse import unquote

from django_cdp.frontend import RUDDERSTACK, SEGMENT, frontend_config

logger = logging.getLogger("django_cdp")

#: The anonymous-id cookie of each browser SDK ``{% cdp_snippet %}`` can load.
COOKIES = {RUDDERSTACK: "rl_anonymous_id", SEGMENT: "ajs_anonymous_id"}
V3_PREFIX = "RS_ENC_v3_"
LEGACY_PREFIX = "RudderEncrypt:"
#: The RudderStack SDK's public passphrase for its v1.1 cookies (obfuscation, not secrecy).
LEGACY_PASSPHRASE = b"Rudder"
#: Longest id accepted; the SDKs write UUIDs (36 characters).
MAX_LENGTH = 200


def cookie_names() -> tuple[str, ...]:
    """The cookies read, in order: that of the SDK ``{% cdp_snippet %}`` loads, or both when
    it renders nothing (the project loads an SDK of its own)."""
    frontend = frontend_config()
    if frontend is not None:
        return (COOKIES[frontend["SDK"]],)
    return (COOKIES[RUDDERSTACK], COOKIES[SEGMENT])


def anonymous_id(cookies: Mapping[str, str]) -> str | None:
    """The anonymous id in the first of :func:`cookie_names` that holds a valid one."""
    for name in cookie_names():
        value = cookies.get(name)
        if value:
            decoded = decode(value)
            if decoded is not None:
                return decoded
    return None


def decode(value: str) -> str | None:
    """The id a cookie value holds, in any of the formats above, or None."""
    text = unquote(value).strip()
    try:
        if text.startswith(V3_PREFIX):
            decoded: object = json.loads(base64.b64decode(text[len(V3_PREFIX) :], validate=True))
        elif text.startswith(LEGACY_PREFIX):
            decrypted = _decrypt_legacy(text[len(LEGACY_PREFIX) :])
            decoded = None if decrypted is None else json.loads(decrypted)
        else:
            decoded = json.loads(text) if text.startswith('"') else text
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return short_text(decoded, MAX_LENGTH)


def short_text(value: object, limit: int) -> str | None:
    """A value the visitor sent (a cookie, a header) if it is short, printable text, stripped;
    None otherwise: such values are ignored, never an error."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > limit or not value.isprintable():
        return None
    return value


def legacy_supported() -> bool:
    """Whether ``RudderEncrypt:`` cookies can be read (the ``cryptography`` package)."""
    return importlib.util.find_spec("cryptography") is not None


@functools.lru_cache(maxsize=1)
def _warn_unsupported() -> None:
    logger.warning(
        "django-cdp: an rl_anonymous_id cookie of RudderStack's v1.1 SDK (RudderEncrypt:) "
        "was ignored: reading it needs the cryptography package "
        "(pip install 'django-cdp[rudderstack-legacy]')."
    )


def _decrypt_legacy(data: str) -> str | None:
    """CryptoJS's ``AES.encrypt(text, passphrase)``: base64 of ``Salted__`` + 8-byte salt +
    AES-256-CBC ciphertext, key and IV derived with OpenSSL's ``EVP_BytesToKey`` (MD5)."""
    if not legacy_supported():
        _warn_unsupported()
        return None
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    raw = base64.b64decode(data, validate=True)
    if len(raw) < 32 or not raw.startswith(b"Salted__") or (len(raw) - 16) % 16:
        return None
    salt, ciphertext = raw[8:16], raw[16:]
    derived, block = b"", b""
    while len(derived) < 48:
        block = hashlib.md5(block + LEGACY_PASSPHRASE + salt).digest()
        derived += block
    decryptor = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:48])).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return (unpadder.update(padded) + unpadder.finalize()).decode()
