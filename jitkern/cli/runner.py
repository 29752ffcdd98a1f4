"""Running warm-up jobs: in this process (one at a time) or on N worker processes.

Workers are plain subprocesses (``python -m jitkern.cli.worker``) fed one job at a time over a
pipe, so at any moment the parent knows which kernel each one compiles (the progress line) and a
worker is never more than one job ahead. They run in their own session: a terminal's Ctrl-C
reaches only the parent, which then stops them. Stopping a worker mid-compile is safe by the
cache's design (value file written before its index row; flock locks die with their holder).
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import subprocess
import sys
from pathlib import Path

from .worker import compile_one


def _apply(job, res: dict) -> None:
    job.status = res["status"]
    job.error = res.get("error", "")
    job.bytes = res.get("bytes", 0)
    job.seconds = res.get("seconds", 0.0)
    if res.get("key"):
        job.key = res["key"]


def run_serial(jobs, progress) -> None:
    for job in jobs:
        progress.start(job)
        _apply(job, compile_one(job.family, job.config, job.target))
        progress.finish(job)


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding jitkern/
        if root not in {str(Path(p or ".").resolve()) for p in sys.path}:
            # found through a path the child would not inherit: hand it over
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "jitkern.cli.worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True)
        self.buf = b""
        self.job = None

    def send(self, job) -> bool:
        msg = {"id": id(job), "family": job.family.name, "config": job.config, "arch": job.target}
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.job = job
        return True

    def close_input(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_parallel(jobs, processes: int, progress) -> None:
    pending = collections.deque(jobs)
    sel = selectors.DefaultSelector()
    workers: list[_Worker] = []
    respawns = len(jobs)

    def feed(w: _Worker) -> None:
        while pending:
            job = pending.popleft()
            if w.send(job):
                progress.start(job)
                return
            pending.appendleft(job)   # the worker is gone; its exit is handled by the reader
            return
        w.job = None
        w.close_input()

    def spawn() -> None:
        w = _Worker()
        workers.append(w)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        feed(w)

    try:
        for _ in range(min(processes, len(jobs))):
            spawn()
        while any(w.job is not None for w in workers):
            for key, _ in sel.select(timeout=0.25):
                w: _Worker = key.data
                chunk = os.read(key.fd, 65536)
                if not chunk:  # the worker exited
                    sel.unregister(key.fileobj)
                    code = w.proc.wait()
                    if w.job is not None:
                        w.job.status = "failed"
                        w.job.error = f"worker process exited with status {code} while compiling"
                        progress.finish(w.job)
                        w.job = None
                    if pending and respawns > 0:
                        respawns -= 1
                        spawn()
                    continue
                w.buf += chunk
                while b"\n" in w.buf and w.job is not None:
                    line, w.buf = w.buf.split(b"\n", 1)
                    res = json.loads(line)
                    job = w.job
                    if res.get("id") == id(job):
                        _apply(job, res)
                        progress.finish(job)
                    feed(w)
            progress.tick()
        for job in pending:  # only when workers kept dying: say so rather than drop them
            job.status, job.error = "failed", "no worker process left to compile it"
            progress.finish(job)
        for w in workers:
            w.close_input()
            w.proc.wait()
    finally:
        for w in workers:
            w.stop()
            if w.proc.stdout:
                w.proc.stdout.close()
        sel.close()
