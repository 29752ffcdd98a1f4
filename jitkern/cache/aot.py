"""Read-only access to a cache directory written by the disk tier (``JITKERN_CACHE_PATH``).

Opened with SQLite's ``immutable`` mode so nothing is written there (no WAL or lock files), which
makes it work in read-only container layers. Reads diskcache's documented table layout: raw
string keys; values either inline (mode 1) or in a file named by ``filename`` (mode 2).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger("jitkern")

_MODE_RAW, _MODE_BINARY = 1, 2


ROWS_SQL = ("SELECT key, size, store_time, access_time, access_count, filename "
            "FROM Cache WHERE raw = 1")


def index_rows(cursor) -> list[dict]:
    """jitkern's entries from a ``ROWS_SQL`` cursor over diskcache's index: key, size (bytes),
    stored, used (access time), hits, filename (relative, None for an inline value)."""
    return [dict(key=k, size=size or 0, stored=st or 0.0, used=at or 0.0, hits=n or 0, filename=fn)
            for k, size, st, at, n, fn in cursor.fetchall()
            if isinstance(k, str) and not k.startswith("jitkern:")]


class ReadOnlyCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._db = None
        db = self.directory / "cache.db"
        if db.is_file():
            # immutable writes nothing (no -shm/-wal files) but ignores a write-ahead log; writers
            # checkpoint on close, so only a leftover log needs plain mode=ro (which may write).
            wal = self.directory / "cache.db-wal"
            pending = wal.is_file() and wal.stat().st_size > 0
            order = ("mode=ro", "mode=ro&immutable=1") if pending else ("mode=ro&immutable=1",)
            for flags in order:
                try:
                    conn = sqlite3.connect(f"file:{quote(str(db))}?{flags}", uri=True,
                                           check_same_thread=False)
                    conn.execute("SELECT count(*) FROM Cache").fetchone()
                    self._db = conn
                    break
                except sqlite3.Error as e:
                    err = e
            else:
                log.warning("jitkern: cannot open read-only cache %s: %s", self.directory, err)

    @property
    def available(self) -> bool:
        return self._db is not None

    def get(self, key: str) -> bytes | None:
        if self._db is None:
            return None
        try:
            row = self._db.execute(
                "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        except sqlite3.Error as e:
            log.warning("jitkern: read-only cache %s: %s", self.directory, e)
            return None
        if row is None:
            return None
        mode, filename, value = row
        if mode == _MODE_RAW:
            return bytes(value)
        if mode == _MODE_BINARY and filename:
            try:
                return (self.directory / filename).read_bytes()
            except OSError as e:
                log.warning("jitkern: read-only cache %s: %s", self.directory, e)
        return None

    def keys(self) -> list[str]:
        if self._db is None:
            return []
        return [r[0] for r in self._db.execute("SELECT key FROM Cache WHERE raw = 1")
                if isinstance(r[0], str) and not r[0].startswith("jitkern:")]

    # --- inspection (``jitkern cache ls`` on a read-only directory)
    def rows(self) -> list[dict]:
        """Every entry's index row, as ``DiskTier.rows()`` gives them."""
        if self._db is None:
            return []
        return index_rows(self._db.execute(ROWS_SQL))

    def peek(self, key: str) -> bytes | None:
        return self.get(key)

    def volume(self) -> int:
        """Bytes on disk: the index plus the value files."""
        db = self.directory / "cache.db"
        return (db.stat().st_size if db.is_file() else 0) + sum(r["size"] for r in self.rows())

