"""Warm-up progress on stderr: a one-line bar with the kernel(s) being compiled on a terminal,
one plain line per finished kernel otherwise (logs, CI), nothing with ``--quiet``."""

from __future__ import annotations

import shutil
import sys
import time


class Progress:
    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.tty = (not quiet) and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.running: dict = {}      # job id -> job
        self.t0 = time.monotonic()
        self._drawn = False

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.quiet:
            return
        self._clear()
        print(text, file=self.stream, flush=True)
        self._draw()

    def start(self, job) -> None:
        self.running[id(job)] = job
        self._draw()

    def finish(self, job) -> None:
        self.running.pop(id(job), None)
        self.done += 1
        if self.quiet:
            return
        if self.tty:
            if job.status == "failed":
                self.note(f"FAILED {job.name} ({job.target}): {job.error.splitlines()[0]}")
            self._draw()
        else:
            detail = (f"{job.seconds:.2f} s" if job.status == "compiled"
                      else job.error.splitlines()[0] if job.status == "failed" else "")
            print(f"[{self.done}/{self.total}] {job.status:8s} {job.name} ({job.target}) {detail}"
                  .rstrip(), file=self.stream, flush=True)

    def tick(self) -> None:
        """Redraw (elapsed time moves while a long compile runs)."""
        self._draw()

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _draw(self) -> None:
        if not self.tty:
            return
        width = shutil.get_terminal_size((100, 20)).columns
        n = 20
        filled = n * self.done // max(1, self.total)
        secs = int(time.monotonic() - self.t0)
        line = f"[{'#' * filled}{'-' * (n - filled)}] {self.done}/{self.total} {secs // 60}:{secs % 60:02d}"
        if self.running:
            jobs = list(self.running.values())
            more = f" (+{len(jobs) - 1})" if len(jobs) > 1 else ""
            line += f" compiling {jobs[0].name} ({jobs[0].target}){more}"
        self.stream.write("\r\x1b[K" + line[: max(10, width - 1)])
        self.stream.flush()
        self._drawn = True
