"""The writable disk tier: a diskcache.Cache of serialized entries, size-capped LRU.

Eviction: diskcache culls ``cull_limit`` least-recently-used entries per write once the volume
is over the cap; at 1 it evicts one entry per write (never a burst of fresh entries), so the
volume stays within about one entry of the cap.

Values are stored as files (``disk_min_file_size=0``) written before their index row commits,
so a crash leaves no half entry behind the index; every read is verified (SHA-256) by the caller.
A directory that cannot be opened for writing degrades this tier to read-only (if it holds a
cache) or off, with one warning, never an exception.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger("jitkern")


class DiskTier:
    def __init__(self, directory: Path, size_limit: int):
        self.directory = Path(directory)
        self.size_limit = size_limit
        self.cache = None
        self.reason = ""
        self._warned_write = False
        try:
            import diskcache

            _make_private_dir(self.directory)
            self.cache = diskcache.Cache(str(self.directory), size_limit=size_limit,
                                         eviction_policy="least-recently-used",
                                         disk_min_file_size=0, cull_limit=1)
            # probe: sqlite opens read-only files without complaint until the first write
            self.cache.set("jitkern:probe", 1)
            atexit.register(self.close)  # closing checkpoints the WAL into cache.db
        except Exception as e:  # PermissionError, sqlite3.OperationalError, OSError, ImportError
            self.close()
            self.reason = f"{type(e).__name__}: {e}"
            warnings.warn(f"jitkern: cache directory {self.directory} is not writable ({self.reason}); "
                          "compiled kernels are kept in memory only for this process",
                          RuntimeWarning, stacklevel=3)

    @property
    def writable(self) -> bool:
        return self.cache is not None

    def get(self, key: str) -> bytes | None:
        if self.cache is None:
            return None
        try:
            return self.cache.get(key, default=None, read=False)
        except Exception as e:
            log.warning("jitkern: disk cache read of %s failed: %s", key[:16], e)
            return None

    def put(self, key: str, blob: bytes) -> bool:
        if self.cache is None:
            return False
        try:
            self.cache.set(key, blob)
            return True
        except Exception as e:
            if not self._warned_write:
                self._warned_write = True
                warnings.warn(f"jitkern: cannot write to the cache directory {self.directory} ({e}); "
                              "kernels compiled now are kept in memory only", RuntimeWarning, stacklevel=3)
            return False

    def delete(self, key: str) -> None:
        if self.cache is not None:
            try:
                self.cache.delete(key)
            except Exception as e:
                log.warning("jitkern: could not drop cache entry %s: %s", key[:16], e)

    def close(self) -> None:
        if self.cache is not None:
            try:
                self.cache.close()
            except Exception:
                pass
        self.cache = None


def _make_private_dir(path: Path) -> None:
    """Create the user's cache directory with mode 0700 (no world-writable files)."""
    if not path.exists():
        old = os.umask(0o077)
        try:
            path.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
