"""The envelope of a remote cache value: an HMAC-SHA256 over the Redis key and the entry bytes.

A shared Redis is writable by every node of a fleet (and by anyone who reaches it), and what it
holds is machine code that jitkern loads onto GPUs. So a value is only used if it was signed
with the fleet's secret, and the signature covers the full Redis key as well as the entry: a
valid value copied under another key (a different kernel, configuration or jitkern version) no
longer verifies.

Layout:  b"JKR1" | mode (1 byte) | tag (32 bytes, mode "H" only) | entry bytes (CacheEntry.to_bytes)
  mode "H": tag = HMAC-SHA256(secret, DOMAIN | redis key | 0x00 | entry bytes)
  mode "U": unsigned (written by a node that has no secret)

A reader with a secret accepts mode "H" with a matching tag only. A reader without a secret
cannot verify anything, so it takes either mode (the tier warned at start-up that entries are
unauthenticated); the entry's own SHA-256 and key check still run on every read.
"""

from __future__ import annotations

import hashlib
import hmac

MAGIC = b"JKR1"
SIGNED = b"H"
UNSIGNED = b"U"
TAG_SIZE = 32
DOMAIN = b"jitkern-remote-entry\x00"  # binds tags to this use of the secret


class Rejected(Exception):
    """A remote value that must not be used; the message says why."""


def _tag(secret: bytes, redis_key: str, blob: bytes) -> bytes:
    mac = hmac.new(secret, DOMAIN, hashlib.sha256)
    mac.update(redis_key.encode())
    mac.update(b"\x00")
    mac.update(blob)
    return mac.digest()


def seal(redis_key: str, blob: bytes, secret: bytes | None) -> bytes:
    """The value stored under ``redis_key`` for the entry bytes ``blob``."""
    if secret is None:
        return MAGIC + UNSIGNED + blob
    return MAGIC + SIGNED + _tag(secret, redis_key, blob) + blob


def open_sealed(redis_key: str, value: bytes, secret: bytes | None) -> bytes:
    """The entry bytes inside ``value`` read from ``redis_key``; raises Rejected if ``secret`` is
    set and the value is unsigned or its tag does not match (compared in constant time)."""
    if len(value) < 5 or value[:4] != MAGIC:
        raise Rejected("not a jitkern remote entry (unknown envelope)")
    mode = value[4:5]
    if mode == SIGNED:
        if len(value) < 5 + TAG_SIZE:
            raise Rejected("truncated signature")
        blob = value[5 + TAG_SIZE:]
        if secret is not None and not hmac.compare_digest(value[5:5 + TAG_SIZE],
                                                          _tag(secret, redis_key, blob)):
            raise Rejected("signature does not match (tampered, signed with another key, "
                           "or stored under another key)")
        return blob
    if mode == UNSIGNED:
        if secret is not None:
            raise Rejected("entry is unsigned (written by a node without JITKERN_REMOTE_CACHE_KEY)")
        return value[5:]
    raise Rejected(f"unknown envelope mode {mode!r}")
