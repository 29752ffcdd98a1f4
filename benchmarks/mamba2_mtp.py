"""Benchmark of the Mamba2 MTP SSM update: jitkern vs FlashInfer vs eager PyTorch, one run.

For each configuration: time per call (median of CUDA-event timings of graph replays after
warm-up), the bytes the spec's roofline says must move (state read, the T intermediate states
when they are stored, the state when it is written back, plus the per-token tensors), achieved
bandwidth, and that bandwidth as a percent of a large device-to-device copy measured in the same
run. Peers in the same run: FlashInfer's selective_state_update (multi-token mode with its
intermediate-state buffer; it has no draft-tree input, so it runs in chain rows only) when it
imports, and the eager PyTorch implementation of the same math (fp32 compute).

Every op in a row does the same work, in the mode an engine calls it in:

- T = 1 (plain decoding): no intermediate states, the state updated in place: read + write.
- T > 1 (speculative verification): the T intermediate states stored and the pool state left
  untouched (``disable_state_update``; the accepted node is committed afterwards), which is
  the spec's roofline example (T = 4, fp32: 4 MiB read + 16 MiB written per sequence).
  ``--update-state`` also writes the state back (T + 2 state units: the earlier rounds' mode).

Before timing, each op's writes are checked once (state changed or not, intermediates stored)
and FlashInfer's outputs are compared with this op's; a mismatch is printed as a note.

Small batches would otherwise run from L2: every timed graph holds R calls that use disjoint
state slots and intermediate rows (R chosen so one replay touches >= 512 MiB), and the time per
call is the replay time over R. Each timing sample is REPLAYS back-to-back replays enqueued
behind an untimed one, so the GPU never waits for the host between the two events (a single
replay per event pair would count the host's graph-launch latency: several us, 2-8% of a
batch-32 call). FlashInfer runs through the same graphs and the same indices.

``--host``: what an engine that calls the op eagerly (no CUDA graph) sees at small batch: the
time per call of back-to-back eager calls (CUDA events around the loop, so the host's per-call
cost is counted whenever it exceeds the kernel's), the host's submission cost per call, and the
graph-replayed device time beside them.

    python benchmarks/mamba2_mtp.py                 # the full table
    python benchmarks/mamba2_mtp.py --quick         # a subset
    python benchmarks/mamba2_mtp.py --story         # H=128, T 1/4/8, batch 1/32/256
    python benchmarks/mamba2_mtp.py --tune          # tiling sweep (threads per row, block size)
    python benchmarks/mamba2_mtp.py --tune-small    # finer tilings at batch 1 and 8, both shapes
    python benchmarks/mamba2_mtp.py --variants      # tree-read and tiling variants, T 4/8
    python benchmarks/mamba2_mtp.py --coarse        # 2-byte default vs coarse layout by grid size
    python benchmarks/mamba2_mtp.py --host          # eager (host-inclusive) calls, batch 1 and 8
    python benchmarks/mamba2_mtp.py --update-state  # T > 1 rows also write the state back
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))

from jitkern.families.mamba2 import (grid_blocks, layout_for_grid, pick_layout,  # noqa: E402
                                     pick_tiling)
from jitkern.ops.device import sm_count  # noqa: E402
from jitkern.ops import mamba2 as m2  # noqa: E402
from bench_timing import eager_per_call, event_median_ms, warm_up  # noqa: E402  (this directory)

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_TOUCH = 512 << 20
REPLAYS = 4      # back-to-back replays per timing sample


def median_ms(fn, warmup=3, reps=15):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return event_median_ms(fn, reps)


def copy_bandwidth():
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    n = 1 << 28
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = busy_median_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / ms / 1e6


def write_bandwidth():
    """GB/s of filling 1 GiB (bytes written): the ceiling of a write-only stream. The update
    writes T + 1 states per state read, so at large T its traffic is mostly writes."""
    dst = torch.empty(1 << 28, device="cuda")
    ms = busy_median_ms(lambda: dst.fill_(1.0), reps=20)
    return dst.numel() * 4 / ms / 1e6


def busy_median_ms(fn, k=REPLAYS, reps=15):
    """Median time of one fn() over samples of k back-to-back calls, each sample enqueued behind
    an untimed call so the device is busy when the first event is recorded; after a warm-up
    (bench_timing.warm_up)."""
    warm_up(fn)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        a.record()
        for _ in range(k):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / k)
    return statistics.median(times)


class Problem:
    """One configuration with R disjoint replicas of its batch (for cache-cold timing)."""

    def __init__(self, H, G, P, N, T, Bt, state_dtype, tree, input_dtype=torch.bfloat16, *,
                 inter=True, update=True):
        self.H, self.G, self.P, self.N, self.T, self.Bt = H, G, P, N, T, Bt
        self.tree, self.update = tree, update
        assert inter or not tree, "tree mode reads parent nodes from the intermediate states"
        sd = state_dtype
        es = torch.tensor([], dtype=sd).element_size()
        self.units = 1 + (T if inter else 0) + (1 if update else 0)   # state-sized transfers
        per_seq = H * P * N * es * self.units
        self.R = R = max(1, min(256, math.ceil(MIN_TOUCH / (Bt * per_seq))))
        S = R * Bt
        dev = "cuda"
        r = lambda *s, dt=input_dtype: (torch.randn(*s, device=dev) * 0.5).to(dt)  # noqa: E731
        self.state = r(S, H, P, N, dt=sd)
        self.inter = torch.empty(S, T, H, P, N, device=dev, dtype=sd) if inter else None
        self.x, self.B, self.C = r(Bt, T, H, P), r(Bt, T, G, N), r(Bt, T, G, N)
        self.dt = r(Bt, T, H) - 1.0
        self.A = -(torch.rand(H, device=dev) * 3 + 0.5)
        self.D = r(H)
        self.dt_bias = r(H) + 0.5
        self.out = torch.empty(Bt, T, H, P, device=dev, dtype=input_dtype)
        self.idx = [torch.arange(i * Bt, (i + 1) * Bt, device=dev, dtype=torch.int32)
                    for i in range(R)]
        par = torch.tensor([(t - 1) // 2 for t in range(T)], dtype=torch.int32, device=dev)
        self.parent = par.expand(Bt, T).contiguous() if tree else None   # binary tree
        # roofline bytes of one call: state read (+ T intermediates) (+ state written), + small
        self.bytes = Bt * H * P * N * es * self.units + Bt * T * (
            2 * H * P * 2 + 2 * G * N * 2 + H * 2)

    def op_args(self, i):
        """The op's 17 positional arguments for replica i (``_update_impl``'s order)."""
        iidx = self.idx[i] if self.inter is not None else None
        return (self.state, self.x, self.dt, self.A, self.B, self.C, self.D, None, self.dt_bias,
                True, self.idx[i], -1, self.inter, iidx, self.parent, not self.update, self.out)

    def prepared(self, i, tiling=None):
        """(plan, ``_launch_update``'s arguments) of replica i's call: validated and planned
        here, with ``tiling`` (TPR, ROWS, RPT[, prefetch]) instead of the op's when given."""
        a = self.op_args(i)
        plan = m2._prepare_update(*a, tiling=tiling)
        return plan, (plan,) + a[:9] + a[10:]   # the launch takes no dt_softplus (in the plan)

    def jitkern_call(self, i, tiling=None, smem_extra=0):
        """The op's call on replica i; with ``tiling`` or ``smem_extra`` (bytes of dynamic shared
        memory added to the launch: fewer resident blocks per SM) a prepared plan with those
        changes (measurements)."""
        if tiling is None and not smem_extra:
            a = self.op_args(i)
            return lambda: m2.mamba2_mtp_ssm_update(
                *a[:10], state_batch_indices=a[10], pad_slot_id=a[11], intermediate_states=a[12],
                intermediate_state_indices=a[13], retrieve_parent_token=a[14],
                disable_state_update=a[15], out=a[16])
        plan, args = self.prepared(i, tiling)
        plan.smem += smem_extra
        return lambda: m2._launch_update(*args)

    def flashinfer_call(self, fi, i):
        H, P, N, T, Bt = self.H, self.P, self.N, self.T, self.Bt
        dt = self.dt[..., None].expand(Bt, T, H, P)          # FlashInfer's stride-0 forms
        A = self.A[:, None, None].expand(H, P, N)
        D = self.D[:, None].expand(H, P)
        bias = self.dt_bias[:, None].expand(H, P)
        return lambda: fi.selective_state_update(
            self.state, self.x, dt, A, self.B, self.C, D, dt_bias=bias, dt_softplus=True,
            state_batch_indices=self.idx[i], pad_slot_id=-1, out=self.out,
            disable_state_update=not self.update, intermediate_states_buffer=self.inter,
            intermediate_state_indices=self.idx[i] if self.inter is not None else None,
            cache_steps=T if self.inter is not None else 0)

    def check_writes(self, call):
        """Run ``call`` once on copy 0; return (out, list of deviations from this problem's
        mode: state written when it must not be or the reverse, intermediates not stored).
        The state slots are restored afterwards."""
        sl = self.idx[0].long()
        before = self.state[sl].clone()
        if self.inter is not None:
            self.inter[sl] = float("nan")
        self.out.fill_(float("nan"))
        call()
        torch.cuda.synchronize()
        bad = []
        changed = not torch.equal(self.state[sl], before)
        if changed != self.update:
            bad.append("wrote the state" if changed else "left the state unwritten")
        if self.inter is not None and torch.isnan(self.inter[sl, :self.T].float()).any():
            bad.append("left intermediate states unstored")
        if torch.isnan(self.out.float()).any():
            bad.append("left outputs unwritten")
        out = self.out.clone()
        self.state[sl] = before
        return out, bad

    def eager_call(self):
        """The same math in eager PyTorch (fp32 compute), vectorized over the batch."""
        idx = self.idx[0].long()
        hpg = self.H // self.G

        def run():
            h = self.state[idx].float()                                   # [Bt, H, P, N]
            d = torch.nn.functional.softplus(self.dt.float() + self.dt_bias.float(),
                                             threshold=20.0)              # [Bt, T, H]
            dA = torch.exp(self.A.float() * d)
            Bh = self.B.float().repeat_interleave(hpg, dim=2)             # [Bt, T, H, N]
            Ch = self.C.float().repeat_interleave(hpg, dim=2)
            x = self.x.float()
            for t in range(self.T):
                if self.parent is not None and t > 0:
                    p = self.parent[:, t].long()
                    ok = (p >= 0) & (p < t)
                    node = self.inter[idx, p.clamp(0, self.T - 1)].float()
                    h = torch.where(ok[:, None, None, None], node, h)
                h = h * dA[:, t, :, None, None] + \
                    (x[:, t] * d[:, t, :, None])[..., None] * Bh[:, t, :, None, :]
                if self.inter is not None:
                    self.inter[idx, t] = h.to(self.inter.dtype)
                y = torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]) + x[:, t] * self.D.float()[:, None]
                self.out[:, t] = y.to(self.out.dtype)
            if self.update:
                self.state[idx] = h.to(self.state.dtype)

        return run


def relative_error(out, ref) -> float:
    """Largest |out - ref| over the largest |ref| (NaN anywhere in out gives NaN)."""
    return ((out.float() - ref.float()).abs().max()
            / ref.float().abs().max().clamp_min(1e-6)).item()


def graph_of(calls):
    g = torch.cuda.CUDAGraph()
    for c in calls:   # warm: compile, load, autotune outside the capture
        c()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def time_calls(calls):
    g = graph_of(calls)
    return busy_median_ms(g.replay) / len(calls)


def call_mode(T, update_state=False):
    """(store intermediates, write the state) of a row: plain decoding at T = 1, speculative
    verification above (the state written back too with ``update_state``)."""
    return dict(inter=False, update=True) if T == 1 else dict(inter=True, update=update_state)


def prewarm_flashinfer(fi, states, Ts, update_state=False):
    """Build FlashInfer's JIT modules (one per state dtype and T) in parallel, before timing."""
    import concurrent.futures
    import time

    def one(sd, T):
        pr = Problem(8, 1, 64, 128, T, 1, DT[sd], False, **call_mode(T, update_state))
        pr.flashinfer_call(fi, 0)()
        torch.cuda.synchronize()

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(len(states) * len(Ts)) as ex:
        futs = {ex.submit(one, sd, T): (sd, T) for sd in states for T in Ts}
        for f in concurrent.futures.as_completed(futs):
            if f.exception() is not None:
                print(f"# FlashInfer pre-build {futs[f]} failed: {f.exception()!r}")
    print(f"# FlashInfer modules built in {time.time() - t0:.0f} s")


def load_flashinfer():
    try:
        import flashinfer.mamba as fim

        return fim
    except Exception as err:   # noqa: BLE001 - any import failure means "not available"
        print(f"# FlashInfer not available: {type(err).__name__}: {err}")
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--story", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-small", action="store_true",
                    help="finer tilings at small batches (grids of few blocks), FlashInfer beside")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--coarse", action="store_true",
                    help="2-byte states: the default layout against the coarse one (pick_layout) "
                         "by grid size, chains and trees, beside the op's choice")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--update-state", action="store_true",
                    help="T > 1 rows also write the state back (T + 2 state units)")
    ap.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")],
                    help="comma-separated batch sizes (default: the mode's)")
    ap.add_argument("--floor", action="store_true",
                    help="chain rows at small batches against a copy of the same bytes (default "
                         "batch 1): how close 1.5x FlashInfer is to the copy's own time")
    ap.add_argument("--ts", type=lambda v: [int(t) for t in v.split(",")],
                    help="comma-separated token counts T for --variants (default 4,8)")
    args = ap.parse_args()

    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"# device: {name}; date: {datetime.date.today()}; torch {torch.__version__}")
    print(f"# copy bandwidth (1 GiB device-to-device, read + write): {bw:.0f} GB/s")
    print(f"# write bandwidth (fill of 1 GiB): {write_bandwidth():.0f} GB/s")
    fi = None if args.no_flashinfer else load_flashinfer()

    if args.tune:
        tune(bw)
        return
    if args.tune_small:
        tune_small(bw, fi, args.batches or [1, 8], args.ts or [1, 4, 8])
        return
    if args.variants:
        variants(bw, args.batches, args.ts)
        return
    if args.coarse:
        coarse_sweep(args.batches or [1, 2, 4, 8, 15, 16, 20, 32, 64], args.ts or [2, 4, 8, 16])
        return
    if args.floor:
        floor(fi, args.batches or [1])
        return
    if args.host:
        host_breakdown()
        host(bw, fi, args.batches or [1, 8], args.update_state)
        return

    shapes = [(128, 8), (32, 2)]
    states = ["fp32", "bf16"]
    Ts = [1, 4, 8]
    batches = [1, 8, 32, 128, 256]
    if args.quick:
        shapes, states, Ts, batches = [(128, 8)], ["fp32"], [8], [1, 32, 256]
    if args.story:
        shapes, batches = [(128, 8)], [1, 32, 256]
    batches = args.batches or batches

    if fi is not None:
        prewarm_flashinfer(fi, states, Ts, args.update_state)

    print("\n## mamba2_mtp_ssm_update (P=64, N=128; bf16 x/B/C/dt/D/dt_bias, fp32 A, softplus, "
          "binary tree in tree rows)")
    print("# T = 1: no intermediate states, state updated (2 state units moved); T > 1: "
          + ("T intermediate states and the state written (T + 2 units)" if args.update_state
             else "T intermediate states stored, state not written (T + 1 units)"))
    hdr = ("| H | G | state | T | tree | batch | jitkern us | GB/s | % copy | FlashInfer us | "
           "% copy | jk speedup | eager us | jk speedup |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for H, G in shapes:
        for sd in states:
            for T in Ts:
                for tree in ((False,) if T == 1 else (False, True)):   # T = 1: no tree
                    for Bt in batches:
                        row(bw, fi, H, G, sd, T, tree, Bt, not args.no_eager, args.update_state)


def row(bw, fi, H, G, sd, T, tree, Bt, eager, update_state=False):
    pr = Problem(H, G, 64, 128, T, Bt, DT[sd], tree, **call_mode(T, update_state))
    where = f"state {sd}, T = {T}, batch {Bt}{', tree' if tree else ''}"
    # Both ops' writes and outputs are checked on the same state before any timing (timed calls
    # that update the state move it on).
    jk_out, bad = pr.check_writes(pr.jitkern_call(0))
    if bad:
        print(f"# note: jitkern {', '.join(bad)} ({where})")
    fi_ok = fi is not None and not tree
    if fi_ok:
        try:
            # the same work as this op: same writes, same outputs (bf16: 2e-2 of the scale)
            fi_out, bad = pr.check_writes(pr.flashinfer_call(fi, 0))
            err = relative_error(fi_out, jk_out)
            if err > 2e-2 or err != err:
                bad.append(f"gave outputs {err:.1e} (relative) from jitkern's")
            if bad:
                print(f"# note: FlashInfer {', '.join(bad)} ({where})")
        except Exception as err:  # noqa: BLE001
            print(f"# FlashInfer failed ({where}): {type(err).__name__}: {err}")
            fi_ok = False
    ms = time_calls([pr.jitkern_call(i) for i in range(pr.R)])
    gbs = pr.bytes / ms / 1e6
    cells = [H, G, sd, T, "yes" if tree else "no", Bt, f"{ms * 1e3:.1f}", f"{gbs:.0f}",
             f"{100 * gbs / bw:.0f}%"]
    if fi_ok:
        try:
            fms = time_calls([pr.flashinfer_call(fi, i) for i in range(pr.R)])
            cells += [f"{fms * 1e3:.1f}", f"{100 * pr.bytes / fms / 1e6 / bw:.0f}%",
                      f"{fms / ms:.2f}x"]
        except Exception as err:  # noqa: BLE001
            cells += [f"error: {type(err).__name__}", "-", "-"]
    else:
        cells += ["-", "-", "-"]
    if eager:
        ems = median_ms(pr.eager_call(), warmup=1, reps=3)
        cells += [f"{ems * 1e3:.0f}", f"{ems / ms:.1f}x"]
    else:
        cells += ["-", "-"]
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    del pr
    torch.cuda.empty_cache()


def floor(fi, batches):
    """Chain rows (both shapes and states, T = 1 / 4 / 8) next to a device-to-device copy of the
    same bytes (read + written), timed the same way (a graph over disjoint replicas, so every
    call reads cold data). At batch 1 the calls take microseconds, and the copy's time there is
    the floor a memory-bound kernel of that size meets: launch, first loads, last stores."""
    print("\n## small batches against a copy of the same bytes (chain rows)")
    print("| H | state | T | batch | MB moved | jitkern us | FlashInfer us | copy us | "
          "FlashInfer / 1.5 us | jitkern / copy | FlashInfer / copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for H, G in [(128, 8), (32, 2)]:
        for sd in ("fp32", "bf16"):
            for T in (1, 4, 8):
                for Bt in batches:
                    pr = Problem(H, G, 64, 128, T, Bt, DT[sd], False, **call_mode(T))
                    ms = time_calls([pr.jitkern_call(i) for i in range(pr.R)])
                    fms = (time_calls([pr.flashinfer_call(fi, i) for i in range(pr.R)])
                           if fi is not None else float("nan"))
                    n = pr.bytes // 8   # floats read, and as many written
                    pairs = [(torch.randn(n, device="cuda"), torch.empty(n, device="cuda"))
                             for _ in range(pr.R)]
                    cms = time_calls([(lambda s=s, d=d: d.copy_(s)) for s, d in pairs])
                    print(f"| {H} | {sd} | {T} | {Bt} | {pr.bytes / 1e6:.1f} | {ms * 1e3:.1f} | "
                          f"{fms * 1e3:.1f} | {cms * 1e3:.1f} | {fms * 1e3 / 1.5:.1f} | "
                          f"{ms / cms:.2f} | {fms / cms:.2f} |", flush=True)
                    del pr, pairs
                    torch.cuda.empty_cache()


TUNE = {   # (threads per block, threads per row, rows per thread) candidates
    "fp32": [(256, 16, 1), (128, 8, 1), (128, 8, 2), (256, 8, 2), (64, 8, 2), (128, 8, 4),
             (128, 16, 2), (128, 4, 2), (128, 4, 4)],
    "bf16": [(128, 4, 1), (128, 4, 2), (256, 4, 2), (64, 4, 2), (128, 4, 4), (128, 8, 2),
             (128, 2, 2), (64, 2, 4)],
}


def tune(bw):
    """Tilings x chain/tree x small and large batches (H=128, G=8, P=64, N=128, T=8)."""
    print("\n## tiling sweep (H=128, G=8, P=64, N=128, T=8)")
    print("| state | tree | batch | threads | TPR | ROWS | RPT | us | % copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sd, cands in TUNE.items():
        for tree in (False, True):
            for Bt in (1, 32, 256):
                pr = Problem(128, 8, 64, 128, 8, Bt, DT[sd], tree)
                for threads, tpr, rpt in cands:
                    tiling = pick_tiling(128, sd, 64, tree, 8, threads=threads, tpr=tpr,
                                         rpt=rpt)
                    ms = time_calls([pr.jitkern_call(i, tiling) for i in range(pr.R)])
                    print(f"| {sd} | {'yes' if tree else 'no'} | {Bt} | {threads} | "
                          f"{tiling[0]} | {tiling[1]} | {tiling[2]} | {ms * 1e3:.1f} | "
                          f"{100 * pr.bytes / ms / 1e6 / bw:.0f}% |", flush=True)
                del pr
                torch.cuda.empty_cache()


SMALL = {   # (threads per block, threads per row, rows per thread): finer blocks for small grids
    "fp32": [(128, 16, 2), (64, 16, 2), (32, 16, 2), (64, 32, 2), (32, 32, 2), (64, 16, 1),
             (32, 16, 1), (32, 32, 1), (64, 8, 2), (32, 8, 2)],
    "bf16": [(64, 8, 2), (128, 8, 2), (32, 8, 2), (32, 8, 1), (64, 16, 2), (32, 16, 2),
             (64, 16, 1), (32, 16, 1), (64, 4, 2), (32, 4, 2)],
}


def _small_cases(shapes, batches, ts):
    for H, G in shapes:
        for sd in ("fp32", "bf16"):
            for T in ts:
                for tree in ((False,) if T == 1 else (False, True)):
                    for Bt in batches:
                        tilings = []
                        for threads, tpr, rpt in SMALL[sd]:
                            t = pick_tiling(128, sd, 64, tree, T, threads=threads, tpr=tpr,
                                            rpt=rpt)
                            if t not in tilings:
                                tilings.append(t)
                        yield H, G, sd, T, tree, Bt, tilings


def _precompile_small(shapes, batches, ts):
    """Compile every candidate of the sweep in parallel (the CLI's warm-up with a manifest)."""
    import json
    import os
    import subprocess
    import tempfile

    from jitkern.families.mamba2 import nemotron_config

    kernels = []
    for H, G, sd, T, tree, Bt, tilings in _small_cases(shapes, batches, ts):
        for tpr, rows, rpt in tilings:
            cfg = nemotron_config(sd, tree, intermediate=T > 1, T=T)
            cfg.update(TPR=tpr, ROWS=rows, RPT=rpt)
            item = dict(family="mamba2_mtp_ssm_update", **cfg)
            if item not in kernels:
                kernels.append(item)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"kernel": kernels}, f)
    t0 = time.time()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "jitkern.cli", "warmup", "--manifest", f.name, "-q"],
                       cwd=root, capture_output=True, text=True)
    os.unlink(f.name)
    print(f"# {len(kernels)} candidate kernels compiled in {time.time() - t0:.0f} s "
          f"(exit {r.returncode}{': ' + r.stderr[-500:] if r.returncode else ''})", flush=True)


def _op_tiling(sd, T, tree, H, Bt, N=128, P=64):
    """(TPR, ROWS, RPT) the op picks for this row (its small-grid rule included)."""
    lay = layout_for_grid(N, sd, P, tree, T, H, Bt, sm_count(torch.device("cuda", 0)))
    return lay["TPR"], lay["ROWS"], lay["RPT"]


def tune_small(bw, fi, batches, ts):
    """Finer tilings where the op's grid is small (batch 1 and 8; H=128/G=8 and the TP=4 slice
    H=32/G=2), beside the op's own choice and FlashInfer (chain rows) in the same run."""
    shapes = [(128, 8), (32, 2)]
    _precompile_small(shapes, batches, ts)
    if fi is not None:
        prewarm_flashinfer(fi, ["fp32", "bf16"], ts)
    print("\n## small-grid tiling sweep (P=64, N=128; the op's mode per T, binary tree)")
    print("| H | state | T | tree | batch | TPR | ROWS | RPT | threads | blocks | us | % copy | "
          "vs op | FlashInfer us | vs FlashInfer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for H, G, sd, T, tree, Bt, tilings in _small_cases(shapes, batches, ts):
        pr = Problem(H, G, 64, 128, T, Bt, DT[sd], tree, **call_mode(T))
        # every tiling's writes and outputs checked against the op's before any timing (timed
        # calls that update the state move it on; the check restores it)
        ref_out, _ = pr.check_writes(pr.jitkern_call(0))
        for tiling in tilings:
            out, bad = pr.check_writes(pr.jitkern_call(0, tiling))
            err = relative_error(out, ref_out)
            if err > 1e-2 or err != err:
                bad.append(f"outputs {err:.1e} (relative) from the op's")
            if bad:
                print(f"# note: tiling {tiling}: {', '.join(bad)}")
        base = time_calls([pr.jitkern_call(i) for i in range(pr.R)])
        fms = None
        if fi is not None and not tree:
            try:
                fms = time_calls([pr.flashinfer_call(fi, i) for i in range(pr.R)])
            except Exception as err:  # noqa: BLE001
                print(f"# FlashInfer failed: {type(err).__name__}: {err}")
        op_tiling = _op_tiling(sd, T, tree, H, Bt)
        for tiling in [None] + tilings:
            ms = base if tiling is None else time_calls(
                [pr.jitkern_call(i, tiling) for i in range(pr.R)])
            tpr, rows, rpt = op_tiling if tiling is None else tiling
            f_us = f"{fms * 1e3:.1f}" if fms else "-"
            f_x = f"{fms / ms:.2f}x" if fms else "-"
            print(f"| {H} | {sd} | {T} | {'yes' if tree else 'no'} | {Bt} | {tpr} | {rows} | "
                  f"{rpt} | {rows // rpt * tpr} | {-(-64 // rows) * H * Bt} | {ms * 1e3:.2f}"
                  f"{' (op)' if tiling is None else ''} | {100 * pr.bytes / ms / 1e6 / bw:.0f}% | "
                  f"{base / ms:.3f}x | {f_us} | {f_x} |", flush=True)
        del pr
        torch.cuda.empty_cache()


VARIANTS = {   # state -> tree -> (threads per block, TPR, RPT, tree_prefetch) candidates
    "fp32": {True: [(128, 16, 2, False), (128, 16, 2, True), (256, 16, 1, False)],
             False: [(256, 16, 1, False), (128, 16, 2, False)]},
    "bf16": {True: [(128, 8, 2, False), (128, 16, 2, False), (256, 16, 2, False),
                    (64, 8, 2, False)],
             False: [(128, 8, 2, False), (128, 16, 2, False), (256, 16, 2, False),
                     (64, 8, 2, False)]},
}


def variants(bw, batches=None, ts=None):
    """Tree-read (prefetch one step ahead or read into the replaced registers) and tiling
    variants, H=128, G=8, P=64, N=128, T 4 and 8; the first candidate is the default."""
    print("\n## variants (H=128, G=8, P=64, N=128)")
    print("| state | tree | T | batch | threads | TPR | ROWS | RPT | prefetch | us | % copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = ((8, 1), (4, 32), (4, 256), (8, 32), (8, 256))
    if batches or ts:
        cases = tuple((T, Bt) for T in (ts or (4, 8)) for Bt in (batches or (1, 32, 256)))
    print(f"# {len(cases)} cases; the first candidate of each group is the default")
    for sd, modes in VARIANTS.items():
        for tree, cands in modes.items():
            for T, Bt in cases:
                pr = Problem(128, 8, 64, 128, T, Bt, DT[sd], tree)
                for threads, tpr, rpt, pf in cands:
                    tiling = pick_tiling(128, sd, 64, tree, T, threads=threads, tpr=tpr, rpt=rpt)
                    ms = time_calls([pr.jitkern_call(i, tiling + (pf,)) for i in range(pr.R)])
                    print(f"| {sd} | {'yes' if tree else 'no'} | {T} | {Bt} | {threads} | "
                          f"{tiling[0]} | {tiling[1]} | {tiling[2]} | {'yes' if pf else 'no'} | "
                          f"{ms * 1e3:.1f} | {100 * pr.bytes / ms / 1e6 / bw:.0f}% |", flush=True)
                del pr
                torch.cuda.empty_cache()


def coarse_sweep(batches, ts, cycles=3):
    """2-byte states with T > 1 (engine calls): the default layout against the coarse one (twice
    the rows per 64-thread block at half the threads per row) by grid size, chains (bf16, and
    fp16 at T = 8) and trees (bf16, T 4 and 8), H = 128 and 32; best of ``cycles`` interleaved
    cycles; the op's choice (layout_for_grid) beside. Grids under one block per SM are left out
    (the small-grid layout runs them)."""
    sms = sm_count(torch.device("cuda", 0))
    print(f"\n## default vs coarse layout (P=64, N=128, binary tree; {sms} SMs)")
    print("| H | state | T | tree | batch | default blocks | per SM | default us | coarse us | "
          "coarse / default | op takes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [("bf16", T, False) for T in ts] + [("fp16", 8, False)] + [
        ("bf16", T, True) for T in ts if T in (4, 8)]
    for H, G in ((128, 8), (32, 2)):
        for sd, T, tree in cases:
            default = pick_layout(128, sd, 64, tree, T)
            coarse = pick_layout(128, sd, 64, tree, T, coarse=True)
            if tree:   # (the op never takes it for trees; measured as the tiling itself)
                coarse = dict(zip(("TPR", "ROWS", "RPT"), pick_tiling(
                    128, sd, 64, tree, T, threads=64, tpr=default["TPR"] // 2, rpt=2)))
            for Bt in batches:
                blocks = grid_blocks(64, default["ROWS"], H, Bt)
                if blocks < sms:
                    continue
                pr = Problem(H, G, 64, 128, T, Bt, DT[sd], tree, **call_mode(T))
                tilings = [(lay["TPR"], lay["ROWS"], lay["RPT"]) for lay in (default, coarse)]
                best = [math.inf, math.inf]
                for _ in range(cycles):
                    for i, t in enumerate(tilings):
                        best[i] = min(best[i], time_calls([pr.jitkern_call(r, t)
                                                           for r in range(pr.R)]))
                op = layout_for_grid(128, sd, 64, tree, T, H, Bt, sms)
                took = "coarse" if op["ROWS"] == coarse["ROWS"] and not tree else "default"
                print(f"| {H} | {sd} | {T} | {'yes' if tree else 'no'} | {Bt} | {blocks} | "
                      f"{blocks / sms:.1f} | {best[0] * 1e3:.2f} | {best[1] * 1e3:.2f} | "
                      f"{best[0] / best[1]:.3f} | {took} |", flush=True)
                del pr
                torch.cuda.empty_cache()


def host_us(fn, n=300, reps=9):
    """Host microseconds per call of fn (n calls per sample, synchronized between samples; n is
    kept under the launch queue's depth so the host never waits for the device)."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def host_breakdown():
    """Where the host time of one eager call goes (bf16 state, T = 1, batch 1)."""
    pr = Problem(128, 8, 64, 128, 1, 1, torch.bfloat16, False)
    full = pr.jitkern_call(0)
    full()
    args = pr.op_args(0)
    plan, largs = pr.prepared(0)
    fn = plan.kernel.function("update")
    kargs = (pr.state, pr.x, pr.dt, pr.A, pr.B, pr.C, pr.D, None, pr.dt_bias, pr.out, pr.inter,
             pr.idx[0], pr.idx[0], None) + plan.static + (-1, 0)
    buf = fn._buffers()
    fn._fill(buf[0], kargs)
    stream = torch.cuda.current_stream().cuda_stream
    g, b = plan.grid, plan.block
    raw = lambda: fn._launch_kernel(fn.ptr, g[0], g[1], g[2], b[0], b[1], b[2], plan.smem,  # noqa
                                    stream, buf[2], 0)
    rows = [("public op (validated plan, launch)", full),
            ("_update_impl (key, plan lookup, launch)", lambda: m2._update_impl(*args)),
            ("_launch_update (prepared plan)", lambda: m2._launch_update(*largs)),
            ("LoadedKernel.launch (packed args)", lambda: plan.kernel.launch(
                "update", plan.grid, plan.block, kargs, plan.smem)),
            ("fill only", lambda: fn._fill(buf[0], kargs)),
            ("cuLaunchKernel via CuPy (pre-packed)", raw)]
    print("\n## host cost per call (bf16 state, T=1, batch 1)")
    print("| path | host us |")
    print("|---|---|")
    for name, f in rows:
        print(f"| {name} | {host_us(f):.2f} |", flush=True)
    del pr
    torch.cuda.empty_cache()


def host(bw, fi, batches, update_state=False):
    """Eager calls (no graph) at small batches: per-call time between events (host-bound when the
    host's per-call cost exceeds the kernel's), host submission cost, and graph device time."""
    print("\n## eager calls, host included (H=128, G=8, P=64, N=128, chain; T = 1 plain decoding, "
          "T > 1 intermediate states" + (" and the state written)" if update_state else ")"))
    hdr = ("| state | T | batch | jk graph us | jk eager us | jk host us | FI graph us | "
           "FI eager us | FI host us | eager: jk speedup | eager: jk % copy | eager: FI % copy |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for sd in ("fp32", "bf16"):
        for T in (1, 4, 8):
            for Bt in batches:
                pr = Problem(128, 8, 64, 128, T, Bt, DT[sd], False, **call_mode(T, update_state))
                calls = [pr.jitkern_call(i) for i in range(pr.R)]
                g_ms = time_calls(calls)
                e_s, h_s = eager_per_call(calls, n=400)
                e_ms, h_us = e_s * 1e3, h_s * 1e6
                cells = [sd, T, Bt, f"{g_ms * 1e3:.1f}", f"{e_ms * 1e3:.1f}", f"{h_us:.1f}"]
                if fi is not None:
                    fcalls = [pr.flashinfer_call(fi, i) for i in range(pr.R)]
                    fg = time_calls(fcalls)
                    fe, fh = eager_per_call(fcalls, n=400)
                    fe, fh = fe * 1e3, fh * 1e6
                    cells += [f"{fg * 1e3:.1f}", f"{fe * 1e3:.1f}", f"{fh:.1f}", f"{fe / e_ms:.2f}x",
                              f"{100 * pr.bytes / e_ms / 1e6 / bw:.0f}%",
                              f"{100 * pr.bytes / fe / 1e6 / bw:.0f}%"]
                else:
                    cells += ["-", "-", "-", "-", f"{100 * pr.bytes / e_ms / 1e6 / bw:.0f}%", "-"]
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
                del pr
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
