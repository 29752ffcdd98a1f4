"""Benchmark: spec_dec_attention vs its peers, one table.

Columns: configuration, KV bytes, time (median over CUDA-graph replays, L2 defeated by rotating
through enough copies of the inputs), percent of the read bandwidth measured in the same run
(a large ``sum``), FlashInfer's ``xqa`` (when ``import flashinfer`` works) and our speedup over
it, FlexAttention (tree as ``mask_mod``, dense gathered K/V), SDPA on a gathered dense copy, and
for trees the percent of the bf16 matmul rate measured with ``torch.matmul``. ``--floor`` adds
a ``torch.sum`` over each row's KV bytes (graph-replayed, L2 defeated as for the op: one read
kernel of that size, launch and ramp included) and the issue's strictest goal for the row as a
ratio and as a time.

    python benchmarks/spec_dec_attention.py [--grid quick|story|sampled|full|padded|small-trees|misses]
        [--no-flex] [--no-dense] [--page-size N] [--layout NHD|HND] [--fp8-qk] [--kv bf16|fp8] [--xqa-no-pdl] [--floor]
        [--explore [--explore-trees [--explore-both]]] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import datetime
import math
import random
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))

from jitkern.ops import spec_dec_attention  # noqa: E402
_op_module = sys.modules["jitkern.ops.spec_dec_attention"]   # the package exports the op itself
from bench_timing import eager_per_call, event_median_ms, warm_up  # noqa: E402  (this directory)
from jitkern.reference.spec_dec_attention import (chain_parents, pack_tree_masks,  # noqa: E402
                                                  random_eagle_tree, tree_visibility)

L2_DEFEAT_BYTES = 256 << 20
DENSE_MAX_BYTES = 4 << 30   # SDPA / Flex peers need a gathered dense copy (and SDPA's scores)


# ---- measurement -------------------------------------------------------------------------------

def time_graph(calls, reps: int = 15) -> float:
    """Median seconds per call: ``calls`` (a list of thunks, one per input copy) captured in one
    CUDA graph, replayed ``reps`` times after a warm-up (bench_timing.warm_up); falls back to an
    eager loop if a call cannot be captured."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                for c in calls:
                    c()
        torch.cuda.current_stream().wait_stream(s)
        run = g.replay
    except Exception:
        torch.cuda.synchronize()

        def run():
            for c in calls:
                c()
    warm_up(run)
    return event_median_ms(run, reps) / 1e3 / len(calls)


def read_bandwidth() -> float:
    """Bytes per second of a torch ``sum`` over 2 GiB: the read ceiling of the tables."""
    return (1 << 31) / read_floor(1 << 31, 1)


def read_floor(nbytes: int, copies: int) -> float:
    """Seconds per call of a torch ``sum`` over ``nbytes`` (bf16), graph-replayed over ``copies``
    buffers as the op's calls are: what one kernel that only reads a row's K/V takes at that
    size, launch and ramp included (the 2 GiB ``read_bandwidth`` has neither)."""
    xs = [torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
          for _ in range(copies)]
    t = time_graph([(lambda x=x: x.sum()) for x in xs])
    del xs
    return t


def issue_goal(qname: str, n: int, ctx: int, batch: int, kvn: str, t_xqa, kv_bytes: int,
               bw: float):
    """The strictest of the issue's speed goals that applies to a row, as a ratio to XQA: 1.0x
    where XQA reads above 90% of the bandwidth, 1.6x at batch 1-8 with context >= 8k, 2x on
    64-node trees (bf16), 1.8x with fp8 KV; None without an XQA time."""
    if t_xqa is None:
        return None
    goals = []
    if kv_bytes / t_xqa / bw > 0.9:
        goals.append(1.0)
    if batch <= 8 and ctx >= 8192:
        goals.append(1.6)
    if "tree" in qname and n == 64 and kvn == "bf16":
        goals.append(2.0)
    if kvn == "fp8":
        goals.append(1.8)
    return max(goals) if goals else None


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = time_graph([lambda: torch.matmul(a, b)], reps=10)
    return 2 * 8192 ** 3 / t


# ---- inputs (built on the GPU: benchmark sizes reach several GB) --------------------------------

def build(batch, hq, hkv, d, ctx, draft, kv_dtype, page_size=64, layout="NHD", seed=0):
    """One input set: uniform draft (parent array), prefix ``ctx``, shuffled pages."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = len(draft)
    L = ctx + n
    npg = (L + page_size - 1) // page_size
    pool = batch * npg
    table = torch.randperm(pool, device="cuda", generator=gen).to(torch.int32).view(batch, npg)
    shape = (pool, page_size, hkv, d) if layout == "NHD" else (pool, hkv, page_size, d)
    kc = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    vc = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    if kv_dtype == torch.float8_e4m3fn:
        kc, vc = (kc * 2).to(kv_dtype), (vc * 2).to(kv_dtype)
    q = torch.randn(batch * n, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    mask = pack_tree_masks([draft] * batch).cuda() if n > 1 else None
    return dict(q=q, k_cache=kc, v_cache=vc, block_tables=table,
                seq_lens=torch.full((batch,), L, dtype=torch.int32, device="cuda"),
                tree_mask=mask, kv_layout=layout,
                kv_scale=0.5 if kv_dtype == torch.float8_e4m3fn else None)


def gathered(a, d):
    """Dense [B, Hkv, L, D] bf16 copies of K and V (fp8 dequantized), for SDPA and Flex."""
    kc, vc, bt = a["k_cache"], a["v_cache"], a["block_tables"]
    batch, npg = bt.shape
    ks = a["kv_scale"] or 1.0
    L = int(a["seq_lens"][0])
    k = kc[bt.long()].to(torch.bfloat16) * ks      # [B, npg, PS, Hkv, D] (HND: [B, npg, Hkv, PS, D])
    v = vc[bt.long()].to(torch.bfloat16) * ks
    if a["kv_layout"] == "HND":
        k, v = k.transpose(2, 3), v.transpose(2, 3)
    k = k.reshape(batch, -1, k.shape[-2], d)[:, :L].transpose(1, 2).contiguous()
    v = v.reshape(batch, -1, v.shape[-2], d)[:, :L].transpose(1, 2).contiguous()
    return k, v


# ---- peers -------------------------------------------------------------------------------------

def xqa_thunk(a, n, hkv, page_size, enable_pdl=None):
    """XQA on ``a``'s inputs; ``enable_pdl`` as flashinfer.xqa takes it (None: its default, a
    programmatic dependent launch where the device supports one)."""
    import flashinfer

    q = a["q"]
    batch = a["seq_lens"].shape[0]
    hq, d = q.shape[1], q.shape[2]
    if n > 1:
        qv = q.view(batch, 1, n, hq, d)
        m = a["tree_mask"].view(torch.uint16).reshape(batch, n, -1).contiguous()
    else:
        qv = q.view(batch, 1, hq, d)
        m = None
    out = torch.empty_like(qv)
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    sem = torch.zeros(2 << 20, dtype=torch.uint32, device="cuda")
    sl = a["seq_lens"].view(batch, 1).to(torch.uint32)
    ks = a["kv_scale"] or 1.0

    def call():
        flashinfer.xqa(qv, a["k_cache"], a["v_cache"], a["block_tables"], sl, out, ws, sem, hkv,
                       page_size, kv_scale=ks, kv_layout=a["kv_layout"], q_seq_len=n, mask=m,
                       enable_pdl=enable_pdl)
    return call, out


def sdpa_thunk(a, n, k, v, vis):
    import torch.nn.functional as F

    batch = a["seq_lens"].shape[0]
    hq, d = a["q"].shape[1], a["q"].shape[2]
    q = a["q"].view(batch, n, hq, d).transpose(1, 2)
    mask = vis.view(1, 1, n, -1)

    def call():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return call


_FLEX = {}


def flex_thunk(a, n, k, v, vis):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    batch = a["seq_lens"].shape[0]
    hq, d = a["q"].shape[1], a["q"].shape[2]
    q = a["q"].view(batch, n, hq, d).transpose(1, 2)
    L = k.shape[2]
    visd = vis.contiguous()

    def mask_mod(b, h, qi, ki):
        return visd[qi, ki]
    bm = create_block_mask(mask_mod, None, None, n, L, device="cuda")

    def call():
        return _FLEX["fn"](q, k, v, block_mask=bm, enable_gqa=True)
    return call


SPLIT_SWEEP = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
STAGE_SWEEP = (2, 3, 4, 5, 6)


def explore(sets, outs, qname, batch, label="", both=False):
    """Time the custom op with other query tiles (trees), split counts, or K/V pipeline depths
    (decode and chains; each with the split count the op would pick for its occupancy), or
    with ``both`` every query tile against every split count (trees), by
    editing the resolved argument tuple of ``prepare`` (positions by name: OP_ARGS).
    Small batches sweep the split count; batch 64 tries a few (finer work against the wave
    tail). Each line also gives the variant's relative difference from the op's own output."""
    from jitkern.families.spec_dec_attention import MAX_SHARED, resident_ctas, shared_bytes
    from jitkern.ops.spec_dec_attention import (OP_ARGS, _spec_dec_attention_op,
                                                pick_num_splits, prepare, reserve_workspace,
                                                workspace_floats)

    Q, K, SL, OUT, WS, QTILE, ROW_TILES, SPLITS, TILES, STAGES, LAYOUT = (
        OP_ARGS[n] for n in ("q", "k_cache", "seq_lens", "out", "workspace", "q_tile", "row_tiles",
                             "num_splits", "kv_tiles", "kv_stages", "kv_layout"))
    base = [list(prepare(**s, out=o)) for s, o in zip(sets, outs)]
    qt0, sp0, rt0 = base[0][QTILE], base[0][SPLITS], base[0][ROW_TILES]
    q0, k0 = base[0][Q], base[0][K]
    total_q, hq, d = q0.shape
    variants = []   # (name, q_tile, row_tiles, splits, stages)
    if "tree" in qname:
        rows = rt0 * qt0
        variants += [(f"q_tile={qt}", qt, -(-rows // qt), sp0, 0)
                     for qt in (32, 64, 128) if qt != qt0]
    sweep = SPLIT_SWEEP if batch <= 8 else (2, 4)
    if "tree" in qname and batch <= 8:
        sweep = tuple(sp for sp in SPLIT_SWEEP if sp0 // 4 <= sp <= max(sp0 * 2, 64))
    variants += [(f"splits={sp}", qt0, rt0, sp, 0) for sp in sweep if sp != sp0]
    if "tree" in qname and both:   # every query tile against every split count
        rows = rt0 * qt0
        tiles = base[0][TILES]
        variants += [(f"q_tile={qt} splits={sp}", qt, -(-rows // qt), sp, 0)
                     for qt in (16, 32, 64, 128) for sp in SPLIT_SWEEP
                     if qt != qt0 and sp <= tiles]
    if "tree" not in qname:
        kvb = k0.element_size()
        cfg = dict(head_dim=d, q_tile=qt0, kv_dtype="fp8_e4m3" if kvb == 1 else "bf16")
        import cupy

        smem = cupy.cuda.runtime.deviceGetAttribute(81, q0.device.index or 0)
        sms = torch.cuda.get_device_properties(q0.device).multi_processor_count
        hkv = k0.shape[2] if base[0][LAYOUT] == "NHD" else k0.shape[1]
        bt = base[0][SL].shape[0]
        for st in STAGE_SWEEP:
            c = dict(cfg, kv_stages=st)
            if shared_bytes(c) > MAX_SHARED:
                continue
            sp = pick_num_splits(bt * hkv * rt0, base[0][TILES] * 64, sms, resident_ctas(c, smem),
                                 total_q * hq, d, bt * base[0][TILES] * 64 * hkv * d * 2 * kvb,
                                 qt0, kvb == 1)
            variants.append((f"kv_stages={st} splits={sp}", qt0, rt0, sp, st))
    ref = outs[0].float()
    for name, qt, row_tiles, sp, st in variants:
        calls, first = [], None
        for b in base:
            a = list(b)
            a[QTILE], a[ROW_TILES], a[SPLITS], a[STAGES] = qt, row_tiles, sp, st
            a[OUT] = torch.empty_like(b[OUT])
            first = first if first is not None else a[OUT]
            if sp > 1:
                a[WS] = reserve_workspace(a[Q].device, workspace_floats(total_q, hq, d, sp))
            calls.append(lambda a=a: _spec_dec_attention_op(*a))
        try:
            t = time_graph(calls)
            diff = float((first.float() - ref).norm() / ref.norm())
            print(f"<!-- explore {label}{qname} batch {batch}: base q_tile={qt0} splits={sp0}; "
                  f"{name}: {t * 1e6:.1f} us (diff {diff:.1e}) -->", flush=True)
        except Exception as e:   # noqa: BLE001
            print(f"<!-- explore {name} failed: {type(e).__name__}: {e} -->", flush=True)


# ---- the table ---------------------------------------------------------------------------------

def grid(kind: str):
    """Rows of the table. 'full': the issue's whole grid (5 shapes x q 1/4/16/64 x ctx 1k/8k/32k x
    batch 1/8/64 x bf16/fp8 KV on the main shape); 'story': the main shape's whole grid, memory-
    bound rows (decode, chains) first, then the other shapes at 8k, batch 1 and 64, bf16;
    'padded': head dims 80/96/112/192 beside 128/256 (decode at batch 64, 16-node trees at 8);
    'sampled' (default): every q on the main shape at (1k, 8), (8k, 1), (8k, 8), (8k, 64),
    (32k, 1), (32k, 8), both KV types, and the other shapes at 8k, batch 1 and 64, bf16; 'quick':
    a few rows."""
    main = (32, 8, 128)
    qspecs = (("1", 1), ("4 chain", 4), ("16 tree", 16), ("64 tree", 64))
    others = ((8, 1, 128), (64, 8, 128), (16, 16, 64), (8, 4, 256))
    rows = []
    if kind == "story":
        for q in qspecs:
            for c in (1024, 8192, 32768):
                for b in (1, 8, 64):
                    for kv in ("bf16", "fp8"):
                        rows.append((main, q, c, b, kv))
        for shape in others:
            for q in (qspecs[0], qspecs[2], qspecs[3]):
                for b in (1, 64):
                    rows.append((shape, q, 8192, b, "bf16"))
        return rows
    if kind == "small-trees":   # trees at batch 1 and 8 (split counts: --explore --explore-trees)
        for shape, q, c, b, kv in (
                (main, qspecs[3], 1024, 1, "bf16"), (main, qspecs[3], 1024, 8, "bf16"),
                (main, qspecs[3], 8192, 1, "bf16"), (main, qspecs[3], 32768, 1, "bf16"),
                (main, qspecs[3], 8192, 1, "fp8"), (main, qspecs[2], 1024, 1, "bf16"),
                (main, qspecs[2], 8192, 1, "bf16"), ((8, 1, 128), qspecs[3], 8192, 1, "bf16"),
                ((8, 1, 128), qspecs[2], 8192, 1, "bf16"),
                ((64, 8, 128), qspecs[3], 8192, 1, "bf16"),
                ((16, 16, 64), qspecs[3], 8192, 1, "bf16"),
                (main, qspecs[2], 32768, 1, "bf16"), (main, qspecs[2], 8192, 8, "bf16"),
                (main, qspecs[3], 8192, 8, "bf16"), (main, qspecs[2], 32768, 8, "bf16"),
                (main, qspecs[3], 1024, 1, "fp8"), (main, qspecs[2], 8192, 1, "fp8"),
                (main, qspecs[2], 1024, 8, "bf16"), (main, qspecs[2], 1024, 8, "fp8"),
                (main, qspecs[2], 32768, 1, "fp8"), (main, qspecs[2], 8192, 8, "fp8")):
            rows.append((shape, q, c, b, kv))
        return rows
    if kind == "misses":   # rows short of a goal in the last story grid (BENCHMARKS.md)
        for shape, q, c, b, kv in (
                (main, qspecs[2], 32768, 1, "bf16"), (main, qspecs[3], 1024, 1, "bf16"),
                ((16, 16, 64), qspecs[3], 8192, 1, "bf16"), (main, qspecs[1], 8192, 8, "fp8"),
                (main, qspecs[0], 8192, 8, "fp8"), (main, qspecs[2], 8192, 8, "fp8"),
                (main, qspecs[3], 8192, 8, "fp8"), (main, qspecs[0], 8192, 64, "bf16"),
                ((16, 16, 64), qspecs[0], 8192, 64, "bf16")):
            rows.append((shape, q, c, b, kv))
        return rows
    if kind == "padded":   # head dims the kernel pads, beside the native size they pad to
        for shape in ((32, 8, 80), (32, 8, 96), (32, 8, 112), (32, 8, 128), (16, 4, 192),
                      (16, 4, 256)):
            rows.append((shape, qspecs[0], 8192, 64, "bf16"))
            rows.append((shape, qspecs[2], 8192, 8, "bf16"))
        return rows
    if kind == "quick":
        for q in (qspecs[0], qspecs[2], qspecs[3]):
            for c, b in ((8192, 1), (8192, 64)):
                for kv in ("bf16", "fp8"):
                    rows.append((main, q, c, b, kv))
        return rows
    if kind == "full":
        cb = [(c, b) for c in (1024, 8192, 32768) for b in (1, 8, 64)]
        other_q, other_b, other_c = qspecs, (1, 8, 64), (1024, 8192, 32768)
    else:
        cb = [(1024, 8), (8192, 1), (8192, 8), (8192, 64), (32768, 1), (32768, 8)]
        other_q, other_b, other_c = (qspecs[0], qspecs[2], qspecs[3]), (1, 64), (8192,)
    for q in qspecs:
        for c, b in cb:
            for kv in ("bf16", "fp8"):
                rows.append((main, q, c, b, kv))
    for shape in others:
        for q in other_q:
            for c in other_c:
                for b in other_b:
                    rows.append((shape, q, c, b, "bf16"))
    return rows


def host_table(bw, have_xqa, page_size):
    """Eager calls (no graph), Llama-3-8B shape at 8k, batch 1 and 8: what an engine that calls
    the op from Python sees when the host's per-call cost exceeds the kernel's; graph-replayed
    device time beside it, and this op's first (validating, planning) call."""
    print("\n## eager calls, host included (32/8/128, 8k, bf16, page %d)" % page_size)
    print("| q | batch | ours graph us | ours eager us | ours host us | first call us | "
          "XQA graph us | XQA eager us | XQA host us | eager: vs XQA | eager: ours %BW | "
          "eager: XQA %BW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = random.Random(0)
    for qname, n in (("1", 1), ("4 chain", 4), ("16 tree", 16)):
        for batch in (1, 8):
            draft = chain_parents(n) if "tree" not in qname else random_eagle_tree(n, rng)
            sets = [build(batch, 32, 8, 128, 8192 - n, draft, torch.bfloat16, page_size, seed=s)
                    for s in range(4)]
            kv_bytes = batch * 8192 * 8 * 128 * 2 * 2
            outs = [torch.empty_like(x["q"]) for x in sets]
            calls = [(lambda x=x, o=o: spec_dec_attention(**x, out=o)) for x, o in zip(sets, outs)]
            _op_module._PLANS.clear()   # the first call below validates and plans again
            t0 = time.perf_counter()
            calls[0]()
            first = time.perf_counter() - t0
            g = time_graph(calls)
            e, h = eager_per_call(calls)
            cells = [qname, batch, f"{g * 1e6:.1f}", f"{e * 1e6:.1f}", f"{h * 1e6:.1f}",
                     f"{first * 1e6:.0f}"]
            if have_xqa:
                xs = [xqa_thunk(x, n, 8, page_size)[0] for x in sets]
                xg = time_graph(xs)
                xe, xh = eager_per_call(xs)
                cells += [f"{xg * 1e6:.1f}", f"{xe * 1e6:.1f}", f"{xh * 1e6:.1f}", f"{xe / e:.2f}x",
                          f"{100 * kv_bytes / e / bw:.0f}%", f"{100 * kv_bytes / xe / bw:.0f}%"]
            else:
                cells += ["-"] * 4 + [f"{100 * kv_bytes / e / bw:.0f}%", "-"]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
            del sets, outs, calls
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=("quick", "story", "sampled", "full", "padded",
                                       "small-trees", "misses"),
                    default="sampled")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--rows", type=int, default=0, help="run only the first N rows")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--layout", choices=("NHD", "HND"), default="NHD",
                    help="K/V cache layout of every row (ours and XQA's alike)")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the peers on a gathered dense copy (SDPA, Flex)")
    ap.add_argument("--explore", action="store_true",
                    help="also time other query tiles / split counts (comment lines)")
    ap.add_argument("--explore-min-ctx", type=int, default=0,
                    help="explore only rows with at least this context")
    ap.add_argument("--explore-trees", action="store_true", help="explore tree rows too")
    ap.add_argument("--explore-both", action="store_true",
                    help="trees: every query tile against every split count")
    ap.add_argument("--host", action="store_true",
                    help="eager (host-inclusive) calls against XQA at batch 1 and 8, then stop")
    ap.add_argument("--budget", type=float, default=0,
                    help="start no new row after this many seconds (0: no limit)")
    ap.add_argument("--fp8-qk", action="store_true",
                    help="fp8 rows: also time the op with allow_fp8_qk=True (two more columns)")
    ap.add_argument("--kv", choices=("bf16", "fp8"), help="only the rows of this KV dtype")
    ap.add_argument("--floor", action="store_true",
                    help="also time a torch sum over the row's KV bytes (graph-replayed, L2 "
                         "defeated as for the op) and print the issue's goal as a time (three "
                         "more columns)")
    ap.add_argument("--xqa-no-pdl", action="store_true",
                    help="also time XQA with enable_pdl=False (its default launches each call as "
                         "a programmatic dependent of the previous kernel; two more columns)")
    args = ap.parse_args()
    t_start = time.monotonic()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    bw = read_bandwidth()
    mm = matmul_rate()
    try:
        import flashinfer  # noqa: F401
        have_xqa = True
        xqa_note = "flashinfer " + getattr(flashinfer, "__version__", "?")
    except Exception as e:   # noqa: BLE001
        have_xqa = False
        xqa_note = f"flashinfer unavailable ({type(e).__name__}: {e})"
    print(f"# spec_dec_attention on {dev}, {datetime.date.today()}; read bandwidth (sum of 2 GiB) "
          f"{bw / 1e12:.2f} TB/s; bf16 matmul {mm / 1e12:.0f} TFLOP/s; {xqa_note}; page {args.page_size}"
          f"{'' if args.layout == 'NHD' else ', ' + args.layout}")
    if args.host:
        host_table(bw, have_xqa, args.page_size)
        return
    extra_head = " fp8_qk us | fp8_qk vs XQA |" if args.fp8_qk else ""
    extra_head += " XQA no-PDL us | vs XQA no-PDL |" if args.xqa_no_pdl else ""
    extra_head += " sum floor us | goal | goal us |" if args.floor else ""
    print("| Hq/Hkv/D | q | ctx | batch | KV | KV MB | ours us | ours %BW | XQA us | XQA %BW | "
          "vs XQA | XQA err | Flex us | SDPA us | ours %MMA |" + extra_head)
    print("|" + "---|" * (15 + 2 * args.fp8_qk + 2 * args.xqa_no_pdl + 3 * args.floor))
    rows = grid(args.grid)
    if args.kv:
        rows = [r for r in rows if r[4] == args.kv]
    if args.rows:
        rows = rows[:args.rows]
    rng = random.Random(0)
    for ri, ((hq, hkv, d), (qname, n), ctx, batch, kvn) in enumerate(rows):
        if args.budget and time.monotonic() - t_start > args.budget:
            print(f"<!-- budget of {args.budget:.0f} s spent: {len(rows) - ri} rows not run -->")
            break
        kv_dtype = torch.float8_e4m3fn if kvn == "fp8" else torch.bfloat16
        draft = chain_parents(n) if "tree" not in qname else random_eagle_tree(n, rng)
        ps = args.page_size
        a0 = build(batch, hq, hkv, d, ctx - n, draft, kv_dtype, ps, args.layout)
        L = ctx
        kv_bytes = batch * L * hkv * d * 2 * a0["k_cache"].element_size()
        copies = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / kv_bytes)))
        sets = [a0] + [build(batch, hq, hkv, d, ctx - n, draft, kv_dtype, ps, args.layout, seed=s)
                       for s in range(1, copies)]
        outs = [torch.empty_like(s["q"]) for s in sets]
        ours_calls = [(lambda s=s, o=o: spec_dec_attention(**s, out=o)) for s, o in zip(sets, outs)]
        t_ours = time_graph(ours_calls)
        cells = dict(ours=t_ours)
        if args.fp8_qk and kvn == "fp8":   # the opt-in e4m3 Q K^T (same inputs and outputs)
            cells["qk"] = time_graph([(lambda s=s, o=o: spec_dec_attention(**s, out=o,
                                                                           allow_fp8_qk=True))
                                      for s, o in zip(sets, outs)])
        if (args.explore and ctx >= args.explore_min_ctx
                and ("tree" not in qname or args.explore_trees)):
            explore(sets, outs, qname, batch, f"{hq}/{hkv}/{d} {kvn} {ctx // 1024}k ",
                    args.explore_both)
        xerr = ""
        if have_xqa:
            try:
                xs = [xqa_thunk(s, n, hkv, ps) for s in sets]
                t_x = time_graph([c for c, _ in xs])
                cells["xqa"] = t_x
                xo = xs[0][1].reshape(outs[0].shape).float()
                xerr = f"{float((xo - outs[0].float()).norm() / outs[0].float().norm()):.1e}"
                if args.xqa_no_pdl:
                    cells["xqa_np"] = time_graph([xqa_thunk(s, n, hkv, ps, enable_pdl=False)[0]
                                                  for s in sets])
            except Exception as e:   # noqa: BLE001
                xerr = f"fail: {type(e).__name__}"
        if args.floor:
            cells["floor"] = read_floor(kv_bytes, copies)
        if not args.no_dense:
            try:
                if kv_bytes > DENSE_MAX_BYTES:
                    raise MemoryError(f"dense copies of {kv_bytes / 1e9:.1f} GB not built")
                k, v = gathered(a0, d)
                ctxp = L - n
                tv = tree_visibility(draft).cuda()
                vis = torch.cat([torch.ones(n, ctxp, dtype=torch.bool, device="cuda"), tv], 1)
                cells["sdpa"] = time_graph([sdpa_thunk(a0, n, k, v, vis)], reps=5)
                if not args.no_flex and "tree" in qname and batch == 8 and ctx == 8192 and (hq, hkv, d) == (32, 8, 128):
                    cells["flex"] = time_graph([flex_thunk(a0, n, k, v, vis)], reps=5)
                del k, v
            except Exception as e:   # noqa: BLE001
                print(f"<!-- dense peers failed: {type(e).__name__}: {e} -->")

        def us(key):
            return f"{cells[key] * 1e6:.1f}" if key in cells else "-"

        def pct(key):
            return f"{100 * kv_bytes / cells[key] / bw:.0f}%" if key in cells else "-"
        ratio = f"{cells['xqa'] / t_ours:.2f}x" if "xqa" in cells else "-"
        extra_cells = ""
        if args.fp8_qk:
            qk_ratio = (f"{cells['xqa'] / cells['qk']:.2f}x" if "xqa" in cells and "qk" in cells
                        else "-")
            extra_cells += f" {us('qk')} | {qk_ratio} |"
        if args.xqa_no_pdl:
            np_ratio = f"{cells['xqa_np'] / t_ours:.2f}x" if "xqa_np" in cells else "-"
            extra_cells += f" {us('xqa_np')} | {np_ratio} |"
        if args.floor:
            goal = issue_goal(qname, n, ctx, batch, kvn, cells.get("xqa"), kv_bytes, bw)
            goal_us = f"{cells['xqa'] / goal * 1e6:.1f}" if goal and "xqa" in cells else "-"
            extra_cells += f" {us('floor')} | {f'{goal:.1f}x' if goal else '-'} | {goal_us} |"
        flops = 4 * batch * n * hq * L * d
        mma = f"{100 * flops / t_ours / mm:.1f}%" if "tree" in qname else ""
        print(f"| {hq}/{hkv}/{d} | {qname} | {ctx // 1024}k | {batch} | {kvn} | "
              f"{kv_bytes / 1e6:.1f} | {us('ours')} | {pct('ours')} | {us('xqa')} | {pct('xqa')} | "
              f"{ratio} | {xerr} | {us('flex')} | {us('sdpa')} | {mma} |{extra_cells}", flush=True)
        del sets, outs, ours_calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
