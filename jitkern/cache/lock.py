"""Cross-process single flight: one advisory lock file per key.

``flock`` locks are released by the kernel when their holder exits, however it dies, so a crash
leaves no stale lock. A waiter that has waited ``timeout`` seconds (a holder that hangs) gives up
and compiles anyway: a duplicate compile is better than a stalled job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from pathlib import Path


def lock_dir(cache_dir: Path, writable: bool) -> Path:
    if writable:
        return Path(cache_dir) / "locks"
    return Path(tempfile.gettempdir()) / f"jitkern-locks-{os.getuid()}"


@contextlib.contextmanager
def key_lock(directory: Path, key: str, timeout: float, on_wait=None):
    """Hold the lock of ``key`` (yields True), or yield False once ``timeout`` has passed.

    ``on_wait()`` is called once if the lock is busy. If no lock file can be made at all (no
    writable place), yields True without locking."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield True
        return
    try:
        deadline = time.monotonic() + timeout
        delay = 0.005
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    got = True  # locking unsupported here: proceed unlocked
                    break
            if not waited:
                waited = True
                if on_wait:
                    on_wait()
            if time.monotonic() >= deadline:
                got = False
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        yield got
    finally:
        os.close(fd)  # releases the lock
