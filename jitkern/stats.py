"""Per-process counters of the cache tiers and the compiler (``jitkern.stats()``)."""

from __future__ import annotations

import threading

_FIELDS = ("compiles", "compile_seconds", "memory_hits", "disk_hits", "aot_hits", "remote_hits",
           "misses", "errors", "compile_errors", "corrupt_entries", "load_errors", "disk_writes",
           "disk_write_errors", "lock_waits", "lock_timeouts", "loads", "remote_misses",
           "remote_writes", "remote_errors", "remote_rejected", "remote_skipped")


class Counters:
    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        for f in _FIELDS:
            setattr(self, f, 0.0 if f == "compile_seconds" else 0)

    def add(self, name: str, n=1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict:
        with self._lock:
            out = {f: getattr(self, f) for f in _FIELDS}
        out["compile_seconds"] = round(out["compile_seconds"], 4)
        return out


COUNTERS = Counters()


def stats() -> dict:
    """Counters of this process: ``compiles``, ``compile_seconds``, ``memory_hits``, ``disk_hits``
    (the writable cache and the read-only AOT directories; ``aot_hits`` counts the latter alone),
    ``remote_hits``, ``misses``, ``errors`` (compile errors, corrupt entries, failed loads and
    writes), and finer counters."""
    return COUNTERS.snapshot()
