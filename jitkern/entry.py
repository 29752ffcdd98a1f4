"""A cache entry: cubin bytes plus metadata, serialized with a SHA-256 that is checked on read.

Layout: b"JKC1" | u32 little-endian metadata length | metadata JSON | cubin. The metadata holds
the cubin's SHA-256 and length, so flipped or missing bytes anywhere are detected.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import asdict, dataclass, field

from .errors import CorruptEntry

MAGIC = b"JKC1"


@dataclass
class CacheEntry:
    key: str
    family: str
    name: str
    config: dict
    arch: str
    nvrtc_version: str
    options: list
    lowered_names: dict          # entry -> lowered (mangled) symbol
    compile_seconds: float
    cubin: bytes = field(repr=False, default=b"")
    created: float = field(default_factory=time.time)
    cubin_sha256: str = ""

    def __post_init__(self):
        if not self.cubin_sha256:
            self.cubin_sha256 = hashlib.sha256(self.cubin).hexdigest()

    @property
    def size(self) -> int:
        return len(self.cubin)

    def metadata(self) -> dict:
        meta = asdict(self)
        del meta["cubin"]
        meta["cubin_size"] = len(self.cubin)
        return meta

    def to_bytes(self) -> bytes:
        meta = json.dumps(self.metadata(), sort_keys=True).encode()
        return MAGIC + struct.pack("<I", len(meta)) + meta + self.cubin

    @classmethod
    def from_bytes(cls, blob: bytes, expect_key: str | None = None) -> "CacheEntry":
        """Parse and verify; raises CorruptEntry saying what is wrong."""
        if len(blob) < 8 or blob[:4] != MAGIC:
            raise CorruptEntry("bad magic (not a jitkern entry or truncated)")
        (n,) = struct.unpack("<I", blob[4:8])
        if len(blob) < 8 + n:
            raise CorruptEntry(f"truncated metadata ({len(blob) - 8} of {n} bytes)")
        try:
            meta = json.loads(blob[8:8 + n])
        except ValueError as e:
            raise CorruptEntry(f"unreadable metadata: {e}") from None
        if not isinstance(meta, dict):
            raise CorruptEntry("metadata is not an object")
        cubin = blob[8 + n:]
        if len(cubin) != meta.get("cubin_size"):
            raise CorruptEntry(f"cubin is {len(cubin)} bytes, expected {meta.get('cubin_size')} (truncated?)")
        digest = hashlib.sha256(cubin).hexdigest()
        if digest != meta.get("cubin_sha256"):
            raise CorruptEntry("cubin SHA-256 mismatch")
        if expect_key is not None and meta.get("key") != expect_key:
            raise CorruptEntry("entry belongs to another key")
        meta.pop("cubin_size", None)
        try:
            return cls(cubin=cubin, **meta)
        except TypeError as e:
            raise CorruptEntry(f"unexpected metadata fields: {e}") from None
