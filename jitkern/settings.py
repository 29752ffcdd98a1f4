"""Environment settings, read when first needed (tests change them between processes)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}

DEFAULT_SIZE_LIMIT = 4 * 2**30
DEFAULT_LOCK_TIMEOUT = 300.0


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '1048576' -> bytes. Raises ValueError naming the accepted forms."""
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number of bytes with an optional unit "
                         "(e.g. 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def cache_dir() -> Path:
    """Writable cache directory: $JITKERN_CACHE_DIR, else $XDG_CACHE_HOME/jitkern, else ~/.cache/jitkern.

    With no HOME at all the fallback is a per-user directory under the system temp dir."""
    env = os.environ.get("JITKERN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "jitkern"
    home = os.environ.get("HOME")
    if home:
        return Path(home) / ".cache" / "jitkern"
    import tempfile

    return Path(tempfile.gettempdir()) / f"jitkern-cache-{os.getuid()}"


def aot_dirs() -> list[Path]:
    """Read-only ahead-of-time cache directories from $JITKERN_CACHE_PATH (colon-separated)."""
    env = os.environ.get("JITKERN_CACHE_PATH", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p]


def size_limit() -> int:
    env = os.environ.get("JITKERN_CACHE_SIZE_LIMIT")
    if not env:
        return DEFAULT_SIZE_LIMIT
    try:
        return parse_size(env)
    except ValueError as e:
        raise ValueError(f"JITKERN_CACHE_SIZE_LIMIT: {e}") from None


def lock_timeout() -> float:
    """Seconds a process waits for another one's compile of the same key before compiling itself."""
    env = os.environ.get("JITKERN_LOCK_TIMEOUT")
    return float(env) if env else DEFAULT_LOCK_TIMEOUT


def arch_override() -> str | None:
    return os.environ.get("JITKERN_ARCH") or None


def log_level() -> str | None:
    return os.environ.get("JITKERN_LOG") or None
