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

from .aot import ROWS_SQL, index_rows

log = logging.getLogger("jitkern")

_HIT = "UPDATE Cache SET access_count = access_count + 1 WHERE key = ? AND raw = 1"


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

    def get(self, key: str, count_hit: bool = True) -> bytes | None:
        """The stored bytes of ``key`` (a use: LRU order), or None. ``count_hit``: also count a
        hit in the entry's ``access_count`` (shown by ``jitkern cache ls``)."""
        if self.cache is None:
            return None
        try:
            blob = self.cache.get(key, default=None, read=False)
        except Exception as e:
            log.warning("jitkern: disk cache read of %s failed: %s", key[:16], e)
            return None
        if blob is not None and count_hit:
            try:  # diskcache keeps access_count only for its LFU policy: count hits ourselves
                self.cache._sql(_HIT, (key,))
            except Exception:
                pass
        return blob

    # --- inspection and maintenance (the CLI); reads diskcache's documented Cache table
    def rows(self) -> list[dict]:
        """Every jitkern entry's index row: key, size (bytes), stored, used (access time),
        hits, filename (relative to the directory, or None for an inline value)."""
        if self.cache is None:
            return []
        return index_rows(self.cache._sql(ROWS_SQL))

    def peek(self, key: str) -> bytes | None:
        """The stored bytes of ``key`` without counting a use (no LRU or hit update)."""
        if self.cache is None:
            return None
        try:
            row = self.cache._sql("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1",
                                  (key,)).fetchone()
            if row is None:
                return None
            mode, filename, value = row
            if filename:
                return (self.directory / filename).read_bytes()
            return bytes(value) if isinstance(value, (bytes, memoryview)) else None
        except Exception as e:
            log.warning("jitkern: disk cache read of %s failed: %s", key[:16], e)
            return None

    def orphan_files(self, min_age: float = 60.0) -> list[Path]:
        """Value files that no index row names (left by a process killed between writing the
        file and committing its row), older than ``min_age`` seconds so that a write in flight
        in another process is never taken for one."""
        if self.cache is None:
            return []
        import time

        named = {r[0] for r in self.cache._sql(
            "SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()}
        now = time.time()
        out = []
        for p in self.directory.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.val"):
            rel = p.relative_to(self.directory).as_posix()
            try:
                old = now - p.stat().st_mtime >= min_age
            except OSError:
                continue
            if rel not in named and old:
                out.append(p)
        return out

    def volume(self) -> int:
        """Bytes on disk (diskcache's estimate: the index plus the value files)."""
        return self.cache.volume() if self.cache is not None else 0

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        if self.cache is None:
            return 0
        return self.cache.clear()

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
