"""Timing helpers shared by the kernel benchmarks (run as scripts: this directory is on sys.path)."""

from __future__ import annotations

import statistics
import time

import torch


WARM_S = 0.03   # seconds of calls before a measurement


def warm_up(fn, seconds: float = WARM_S) -> None:
    """Call ``fn`` (synchronizing) until ``seconds`` have passed, at least once. A single warm-up
    call after seconds of host work (inputs, peers' JIT builds, dense copies) left the first op
    timed in a spec-dec row up to 11% slow (H200; BENCHMARKS.md, spec-dec, fifth session); the
    cause was not isolated (SM clocks sampled once a second read 1980 MHz)."""
    t0 = time.perf_counter()
    while True:
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            return


def event_median_ms(fn, reps: int) -> float:
    """Median milliseconds of one ``fn()`` between two CUDA events, over ``reps`` samples (the
    caller warms ``fn`` up first)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def eager_per_call(calls, n: int = 200, reps: int = 7) -> tuple:
    """(seconds per call of ``n`` back-to-back eager calls between two CUDA events, host seconds
    per call to submit them), medians over ``reps`` samples. The calls cycle through ``calls``
    (one per input copy, so nothing runs from L2); when the host's per-call cost exceeds the
    kernel's, the first number is host-bound: what an engine calling the op from Python sees."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    dev, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        for i in range(n):
            calls[i % len(calls)]()
        t1 = time.perf_counter()
        b.record()
        b.synchronize()
        dev.append(a.elapsed_time(b) / 1e3 / n)
        host.append((t1 - t0) / n)
    return statistics.median(dev), statistics.median(host)
