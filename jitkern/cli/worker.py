"""A warm-up worker process: compiles the jobs it reads from stdin, one JSON line each, and
answers one JSON line per job on stdout. ``python -m jitkern.cli.worker``.

It ignores SIGINT: the parent owns Ctrl-C and stops its workers. When the parent goes away its
stdin closes and the worker exits after the job in hand. Each result is written by the service
(disk cache, per-key lock) before it is reported, so a worker killed at any point leaves either
a complete entry or none.
"""

from __future__ import annotations

import json
import signal
import sys


def compile_one(family, config: dict, arch: str) -> dict:
    """Bring ``family`` at ``config`` for ``arch`` into the cache: status 'compiled' (NVRTC ran
    here), 'cached' (a tier had it) or 'failed' (with the error text)."""
    from .. import service, stats
    from ..errors import JitkernError

    before = stats()["compiles"]
    try:
        e = service.compile(family, config, arch=arch)
    except (JitkernError, ValueError, OSError) as err:
        return {"status": "failed", "error": str(err) or type(err).__name__}
    compiled = stats()["compiles"] > before
    return {"status": "compiled" if compiled else "cached", "key": e.key, "bytes": e.size,
            "seconds": e.compile_seconds if compiled else 0.0}


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..family import get_family

    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            res = compile_one(get_family(job["family"]), job["config"], job["arch"])
        except Exception as err:  # never die on one job: report it and take the next
            res = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        res["id"] = job["id"]
        out.write(json.dumps(res) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
