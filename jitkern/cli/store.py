"""The cache directory as the cache commands see it: opening it, reading entry metadata,
checking an entry against this installation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .common import CliError


def cache_dir(args) -> Path:
    from .. import settings

    return Path(args.cache_dir).expanduser() if getattr(args, "cache_dir", None) else settings.cache_dir()


def open_disk(args, create: bool = False, write: bool = True):
    """The cache in the chosen directory, or None when there is no cache there.

    ``write``: the writable disk tier, or CliError saying why not. Otherwise a directory that
    cannot be written (a cache baked into an image) is opened read-only for inspection. Only
    ``create=True`` (import) makes a missing directory."""
    from .. import settings
    from ..cache.aot import ReadOnlyCache
    from ..cache.disk import DiskTier

    d = cache_dir(args)
    if not create and not (d / "cache.db").is_file():
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        disk = DiskTier(d, settings.size_limit())
    if disk.writable:
        return disk
    if not write:
        ro = ReadOnlyCache(d)
        if ro.available:
            return ro
    msg = caught[0].message if caught else disk.reason
    raise CliError(f"cannot open the cache at {d} for writing: {msg}")


def metadata(blob: bytes) -> dict | None:
    """The metadata of a serialized entry (no checksum check), or None if it is unreadable."""
    try:
        if blob[:4] != b"JKC1":
            return None
        (n,) = struct.unpack("<I", blob[4:8])
        return json.loads(blob[8:8 + n])
    except Exception:
        return None


def read_metadata(disk, row: dict) -> dict | None:
    """Metadata of the entry behind an index row, reading only the head of its file."""
    if row["filename"]:
        try:
            with open(disk.directory / row["filename"], "rb") as f:
                head = f.read(8)
                if len(head) < 8 or head[:4] != b"JKC1":
                    return None
                (n,) = struct.unpack("<I", head[4:8])
                return json.loads(f.read(n))
        except (OSError, ValueError):
            return None
    blob = disk.peek(row["key"])
    return metadata(blob) if blob else None


class CurrentKeys:
    """Whether an entry's key is the one this installation computes for its (family,
    configuration, target): if not, it was built from other sources, headers, NVRTC or options
    and can never be hit (stale)."""

    def __init__(self):
        from ..family import registered

        self.families = {f.name: f for f in registered()}

    def key_inputs(self, meta: dict) -> dict | None:
        from ..key import key_inputs
        from ..service import SERVICE

        fam = self.families.get(meta.get("family"))
        if fam is None:
            return None
        try:
            spec = fam.specialize(meta.get("config") or {})
            return key_inputs(spec, meta["arch"], SERVICE.closure(fam))
        except Exception:
            return None

    def is_current(self, meta: dict) -> bool:
        inputs = self.key_inputs(meta)
        return inputs is not None and key_of_inputs(inputs) == meta.get("key")


def key_of_inputs(inputs: dict) -> str:
    """The cache key of a key-inputs dict (as jitkern.key.cache_key hashes it)."""
    import hashlib

    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
