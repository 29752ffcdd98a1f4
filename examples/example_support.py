"""What the examples share: which kernels a run compiled, a second run in a fresh process, timing.

- ``CompileRecorder`` collects the one log record jitkern writes per cold compile (kernel name,
  target, seconds) next to the ``jitkern.stats()`` counters, so an example can say *which*
  kernels this run compiled and how long each took.
- ``rerun_in_fresh_process`` runs the example script again with ``--child`` in a new interpreter
  with the same environment (same ``JITKERN_CACHE_DIR``): the kernels now come from the disk
  cache, and the child reports its own counters as one JSON line.
- ``median_seconds`` times a GPU (or CPU) function the way the benchmarks do: warm-up, then the
  median of synchronized wall-clock runs.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time


class CompileRecorder(logging.Handler):
    """Records jitkern's "compiled <kernel> for <arch> in <s> s" log lines while installed.

    Use as a context manager; ``compiled`` is a list of ``(kernel name, arch, seconds)``."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.compiled: list[tuple[str, str, float]] = []
        self._logger = logging.getLogger("jitkern")
        self._old_level = None

    def emit(self, record: logging.LogRecord) -> None:
        # service.py logs ("jitkern: compiled %s for %s in %.2f s", name, arch, seconds)
        if record.msg.startswith("jitkern: compiled") and len(record.args or ()) == 3:
            name, arch, seconds = record.args
            self.compiled.append((str(name), str(arch), float(seconds)))

    def __enter__(self) -> "CompileRecorder":
        self._old_level = self._logger.level
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)


def jit_counters() -> dict:
    """The jitkern counters of this process that the examples print."""
    import jitkern

    s = jitkern.stats()
    return {k: s[k] for k in ("compiles", "compile_seconds", "memory_hits", "disk_hits",
                              "aot_hits", "remote_hits", "errors")}


def print_compile_report(recorder: CompileRecorder, counters: dict) -> None:
    """One line per kernel compiled in this process, then the totals."""
    if recorder.compiled:
        print(f"kernels compiled by this run ({len(recorder.compiled)}):")
        for name, arch, seconds in recorder.compiled:
            print(f"  {seconds:6.2f} s  {name}  [{arch}]")
    else:
        print("kernels compiled by this run: none (all came from the caches)")
    print(f"jitkern.stats(): compiles={counters['compiles']} "
          f"compile_seconds={counters['compile_seconds']:.2f} "
          f"disk_hits={counters['disk_hits']} (aot {counters['aot_hits']}) "
          f"remote_hits={counters['remote_hits']} memory_hits={counters['memory_hits']} "
          f"errors={counters['errors']}")


def rerun_in_fresh_process(script: str, argv: list[str], timeout: float = 600) -> dict:
    """Run ``python script *argv --child`` with this process's environment; return the JSON
    object the child prints last (its counters and check result)."""
    proc = subprocess.run([sys.executable, script, *argv, "--child"], capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode not in (0, 1) or not lines:
        raise RuntimeError(f"the second run failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def median_seconds(fn, setup=None, reps: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` (CUDA synchronized before and after each run).

    ``setup()`` runs before every call, untimed (e.g. restoring caches that ``fn`` mutates)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64 (inf when either holds a NaN)."""
    import torch

    a64, b64 = a.double(), b.double()
    if bool(torch.isnan(a64).any()) or bool(torch.isnan(b64).any()):
        return float("inf")
    scale = float(b64.abs().max()) if b64.numel() else 0.0
    return float((a64 - b64).abs().max()) / max(scale, 1e-30) if a64.numel() else 0.0
