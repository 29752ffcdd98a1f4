"""Probe: compile-time variants of both kernel families' memory-bound paths, A/B in one run.

Each variant is the family with extra compile-time macros (a derived family with one-value
parameters, so the ops pick it up unchanged). Variants of a row are timed in turn, the cycle
repeated, and each variant's best cycle median reported beside the default's.

Mamba2 (JK_LD_HINT: 1 = ld .L2::256B, 2 = + .L1::no_allocate; JK_ST_HINT: 0 = plain st (the
tree kernels' default), 1 = st.cs (the chain kernels'), 2 = L2 evict_first policy) on the state
loads and the intermediate / final state stores.

Spec-dec: JK_SD_WARP_PIPE 0 (the CTA-wide K/V pipeline instead of warp-private ones where the
CTA has one row slab), JK_SD_WGMMA 0 (mma.sync instead of warpgroup MMAs for 64- and 128-row
query tiles), JK_SD_FP8_PAIRS 0 (the earlier direct fp8 fragments: one permute or shift per
value pair), JK_SD_RESCALE_TAU 0 (the O accumulators rescaled whenever a row's max grows),
JK_SD_TILE_BASE 0 (a 64-bit address per copied K/V row), JK_SD_Q_PERMUTED 0 (fp8: the query's
A fragments gathered by 64-bit loads), JK_SD_WG_PIPE 0 ("WG CTA pipe": one CTA-wide K/V pipeline
for 64-row warpgroup tiles), fp8_qk (the op's allow_fp8_qk: e4m3 Q K^T on fp8 trees; set here
for every row, 128-row tiles included, which the op leaves out),
kv_stages 3 / 4 / 5 / 6 and kv_tile 128 (configuration overrides), 2 / 3 / 4 / 8 / 16 / 32 / 64
splits (the op's num_kv_splits), "no TMA" (the cp.async K/V copies where the op uses tensor maps),
"TMA on every grid" (tensor maps where the op's grid rule keeps cp.async), "shape tiles" (the
shape's query tile where the op picks a smaller one for a grid of little work per SM) and
JK_SD_PROBE_LOAD_ONLY (the tile loop without its arithmetic: the loads' own ceiling),
JK_SD_PROBE_EMPTY ("empty": no KV tiles at all, so the launch, prologue, epilogue and merge
alone: a split call's fixed cost), with XQA's
time on the same inputs when flashinfer imports; each variant that does the arithmetic is also
checked against the default's output. Other spec-dec hooks the kernel keeps: JK_SD_L2_PREFETCH
(the cp.async L2 prefetch size).

    python benchmarks/probe_cache_hints.py [--only mamba|attention] [--tree-only] [--engine]
        [--row "32/8/128 q=1 8k b=64 bf16" ...] [--variant mma.sync ...]
        (--variant "load-only+2 splits": variants combined; --variant "tile 64x16": the query
        tile and split count forced; --row takes any row of that form; each row prints the
        op's own tiling)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from jitkern.family import KernelFamily, Param  # noqa: E402
from jitkern.families.spec_dec_attention import tma_shape  # noqa: E402
from jitkern.ops import mamba2 as m2  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402

sda = importlib.import_module("jitkern.ops.spec_dec_attention")   # the package exports the op
import mamba2_mtp as mb  # noqa: E402
import spec_dec_attention as sb  # noqa: E402

CYCLES = 3


def derived(base: KernelFamily, tag: str, macros: dict) -> KernelFamily:
    """``base`` with one-value parameters for ``macros`` (everything else, arch included, kept;
    a fresh specialization memo)."""
    extra = tuple(Param(m.lower(), (v,), macro=m, default=v) for m, v in macros.items())
    return dataclasses.replace(base, name=f"{base.name}+{tag}", params=base.params + extra,
                               warmup=(), _specs={})


def ab(name, variants, make_calls, timer, unit_bytes, ceiling):
    """Time each variant's calls in turn, CYCLES times; print one line per variant."""
    best = {tag: math.inf for tag, _ in variants}
    failed = {}
    for _ in range(CYCLES):
        for tag, use in variants:
            if tag in failed:
                continue
            use()
            try:
                t = timer(make_calls())
            except Exception as e:   # a forced variant the op refuses: report it, time the rest
                failed[tag] = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
                continue
            best[tag] = min(best[tag], t)
    for tag, why in failed.items():
        print(f"<!-- {name} {tag}: failed: {why[:300]} -->", flush=True)
    variants = [v for v in variants if v[0] not in failed]
    base = best[variants[0][0]]
    for tag, _ in variants:
        t = best[tag]
        print(f"| {name} | {tag} | {t * 1e6:.1f} | {100 * unit_bytes / t / ceiling:.1f}% | "
              f"{base / t:.3f}x |", flush=True)   # > 1: the variant is faster


MAMBA2 = m2.MAMBA2   # the op's family; variants are derived from it


def use_mamba2(fams: dict, tag: str, macros: dict) -> None:
    """Make the op run Mamba2 with extra compile-time ``macros`` (none: the family itself): a
    derived family, made once per macro set and kept in ``fams``; cached plans dropped."""
    key = tuple(sorted(macros.items()))
    if macros and key not in fams:
        fams[key] = derived(MAMBA2, tag, macros)
    m2.MAMBA2 = fams[key] if macros else MAMBA2
    m2._plans.clear()


def mamba_name(sd, T, Bt, tree) -> str:
    """A Mamba2 row's printed name (profile_row.py takes the same)."""
    return f"{sd} T={T} b={Bt} {'tree' if tree else 'chain'}"


def ab_mamba(name, variants, pr, call, bw):
    """``ab`` over problem ``pr``'s replicas, ``call(i)`` making replica i's call."""
    ab(name, variants, lambda: [call(i) for i in range(pr.R)],
       lambda calls: mb.time_calls(calls) / 1e3, pr.bytes, bw)


def mamba(bw, tree_only=False):
    chain_hints = [("default (st.cs)", {}), ("plain st", {"JK_ST_HINT": 0}),
                   ("st-evict-first", {"JK_ST_HINT": 2}), ("ld256+st.cs", {"JK_LD_HINT": 1}),
                   ("ld256-noL1+st.cs", {"JK_LD_HINT": 2})]
    tree_hints = [("default (plain st)", {}), ("st.cs", {"JK_ST_HINT": 1}),
                  ("64-register cap", {"JK_MIN_BLOCKS": 16})]
    fams = {}

    def user(tag, mac):
        return lambda: use_mamba2(fams, tag.split()[0], mac)

    print("\n## Mamba2 (H=128, G=8, P=64, N=128); % of copy")
    print("| row | variant | us | % copy | vs default |\n|---|---|---|---|---|")
    rows = [("bf16", 8, 32, True), ("bf16", 8, 256, True), ("bf16", 4, 256, True),
            ("fp32", 8, 256, True), ("fp32", 4, 32, True)]
    if not tree_only:
        rows = [("bf16", 1, 32, False), ("bf16", 8, 32, False), ("bf16", 4, 32, False),
                ("bf16", 8, 256, False), ("fp32", 4, 32, False), ("fp32", 4, 256, False),
                ("fp32", 1, 32, False)] + rows
    for sd, T, Bt, tree in rows:
        hints = tree_hints if tree else chain_hints
        if sd == "fp32":
            hints = [h for h in hints if "JK_MIN_BLOCKS" not in h[1]]
        variants = [(tag, user(tag, mac)) for tag, mac in hints]
        pr = mb.Problem(128, 8, 64, 128, T, Bt, mb.DT[sd], tree)
        ab_mamba(mamba_name(sd, T, Bt, tree), variants, pr, pr.jitkern_call, bw)
        pr = None
        torch.cuda.empty_cache()
    use_mamba2(fams, "", {})


ENGINE_TILINGS = {   # (TPR, ROWS, RPT) candidates besides the default, engine-mode rows
    "fp32": [(16, 16, 1), (16, 16, 2), (8, 16, 2)],
    "bf16": [(8, 16, 2), (8, 32, 2), (8, 64, 2)],
}


def resident_blocks(pr, extras):
    """Blocks per SM the occupancy calculator gives the op's kernel for problem ``pr``, with
    each of ``extras`` bytes of dynamic shared memory added."""
    from cupy_backends.cuda.api import driver

    plan, _ = pr.prepared(0)
    fn = plan.kernel.function("update")
    return [driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, plan.block[0],
                                                             plan.smem + e) for e in extras]


def mamba_residency(bw):
    """Fewer resident blocks per SM (padded dynamic shared memory) at batch 32, where a
    launch's last wave drains: its cost scales with the work resident per SM."""
    print("\n## Mamba2 resident blocks per SM (H=128, G=8, P=64, N=128); % of copy")
    print("| row | variant | us | % copy | vs default |\n|---|---|---|---|---|")
    rows = [("bf16", 4, 32, False), ("bf16", 8, 32, False), ("bf16", 1, 32, False),
            ("bf16", 8, 32, True), ("fp32", 4, 32, False), ("fp32", 8, 32, True),
            ("bf16", 4, 256, False), ("bf16", 8, 8, False)]
    current = {"extra": 0}
    extras = (0, 4096, 8192, 12288, 20480)
    for sd, T, Bt, tree in rows:
        pr = mb.Problem(128, 8, 64, 128, T, Bt, mb.DT[sd], tree, **mb.call_mode(T))
        variants = []
        for extra, n in zip(extras, resident_blocks(pr, extras)):
            def use(extra=extra):
                current["extra"] = extra
            variants.append((f"smem +{extra // 1024} KB ({n} blocks/SM)", use))
        ab_mamba(mamba_name(sd, T, Bt, tree), variants, pr,
                 lambda i: pr.jitkern_call(i, smem_extra=current["extra"]), bw)
        pr = None
        torch.cuda.empty_cache()


def mamba_engine(bw):
    """The calls an engine makes (benchmarks/mamba2_mtp.py's rows): T = 1 plain decoding (no
    intermediate states, state written), T > 1 verification (intermediates stored, the state
    left untouched). Variants: the store hint and the tiling."""
    fams = {}
    current = {"tiling": None}

    def user(tag, mac, tiling):
        def use():
            use_mamba2(fams, tag.split()[0], mac)
            current["tiling"] = tiling
        return use

    print("\n## Mamba2 engine-mode calls (H=128, G=8, P=64, N=128); % of copy")
    print("| row | variant | us | % copy | vs default |\n|---|---|---|---|---|")
    # (state, T, batch, tree, state written back too: the --update-state mode)
    rows = [("fp32", 4, 32, False, False), ("fp32", 4, 256, False, False),
            ("fp32", 8, 32, False, False), ("bf16", 4, 32, False, False),
            ("bf16", 4, 256, False, False), ("bf16", 8, 32, False, False),
            ("fp32", 1, 32, False, False), ("fp32", 1, 256, False, False),
            ("bf16", 1, 32, False, False), ("bf16", 1, 256, False, False),
            ("fp32", 4, 32, True, False), ("bf16", 8, 32, True, False),
            ("fp32", 4, 32, False, True), ("fp32", 4, 256, False, True)]
    for sd, T, Bt, tree, update in rows:
        default = m2.pick_layout(128, sd, 64, tree, T)
        dt = (default["TPR"], default["ROWS"], default["RPT"])
        other_hint = {"JK_ST_HINT": 1 if tree else 0}
        hint_tag = "st.cs" if tree else "plain st"
        variants = [("default " + str(dt), user("default", {}, None)),
                    (hint_tag, user(hint_tag, other_hint, None))]
        if T == 1:   # plain decoding: read and write the same lines; the load/store hints
            variants += [(tag, user(tag, mac, None)) for tag, mac in (
                ("ld256", {"JK_LD_HINT": 1}), ("ld256-noL1", {"JK_LD_HINT": 2}),
                ("st-evict-first", {"JK_ST_HINT": 2}))]
        for t in ENGINE_TILINGS[sd]:
            if t != dt:
                variants.append((f"tiling {t}", user("tiling", {}, t)))
                variants.append((f"tiling {t} {hint_tag}", user(hint_tag, other_hint, t)))
        pr = mb.Problem(128, 8, 64, 128, T, Bt, mb.DT[sd], tree, **mb.call_mode(T, update))
        mode = " (decode)" if T == 1 else " (verify + state)" if update else " (verify)"
        ab_mamba(mamba_name(sd, T, Bt, tree) + mode, variants, pr,
                 lambda i: pr.jitkern_call(i, current["tiling"]), bw)
        pr = None
        torch.cuda.empty_cache()
    use_mamba2(fams, "", {})


def row_name(shape, n, ctx, batch, kvn, layout="NHD", page_size=64):
    hq, hkv, d = shape
    return (f"{hq}/{hkv}/{d} q={n} {ctx // 1024}k b={batch} {kvn}"
            + (f" {layout}" if layout != "NHD" else "")
            + (f" p{page_size}" if page_size != 64 else ""))


def parse_row(name):
    """The row tuple of a printed row name (row_name's inverse), e.g. "32/8/128 q=16 1k b=1 fp8",
    "16/16/64 q=1 8k b=64 bf16 HND" or "32/8/128 q=1 32k b=1 fp8 p16" (page size 16; 64 when
    not named)."""
    shape, n, ctx, batch, kvn, *rest = name.split()
    hq, hkv, d = (int(x) for x in shape.split("/"))
    layout = next((x for x in rest if x in ("NHD", "HND")), "NHD")
    page = next((int(x[1:]) for x in rest if x.startswith("p")), 64)
    return ((hq, hkv, d), int(n[2:]), int(ctx[:-1]) * 1024, int(batch[2:]), kvn, layout, page)


def attention(rbw, match=(), only_variants=()):
    base = sda.SPEC_DEC_ATTENTION
    base_config = sda.kernel_config
    # (tag, extra macros, configuration overrides); the first of each list is the default
    variants_all = [("default", {}, {}), ("CTA pipe", {"JK_SD_WARP_PIPE": 0}, {}),
                    ("load-only", {"JK_SD_PROBE_LOAD_ONLY": 1}, {}),
                    ("empty", {"JK_SD_PROBE_EMPTY": 1}, {}),
                    ("mma.sync", {"JK_SD_WGMMA": 0}, {}),
                    ("fp8 per-pair", {"JK_SD_FP8_PAIRS": 0}, {}),
                    ("eager rescale", {"JK_SD_RESCALE_TAU": 0}, {}),
                    ("row addresses", {"JK_SD_TILE_BASE": 0}, {}),
                    ("Q gathered", {"JK_SD_Q_PERMUTED": 0}, {}),
                    ("both old", {"JK_SD_TILE_BASE": 0, "JK_SD_Q_PERMUTED": 0}, {}),
                    ("WG CTA pipe", {"JK_SD_WG_PIPE": 0}, {}),
                    ("fp8_qk", {}, {"fp8_qk": True}),
                    ("2 stages", {}, {"kv_stages": 2}),
                    ("3 stages", {}, {"kv_stages": 3}), ("4 stages", {}, {"kv_stages": 4}),
                    ("5 stages", {}, {"kv_stages": 5}),
                    ("kv_tile 128", {}, {"kv_tile": 128}),
                    ("no PDL", {}, {"merge_pdl": False}),
                    ("no PDL trigger", {"JK_SD_PDL": 0}, {"merge_pdl": False}),
                    ("PDL at start", {"JK_SD_PDL": 1}, {}),
                    ("2 splits", {}, {"num_kv_splits": 2}), ("3 splits", {}, {"num_kv_splits": 3}),
                    ("4 splits", {}, {"num_kv_splits": 4}), ("6 stages", {}, {"kv_stages": 6}),
                    ("no TMA", {}, {"kv_tma": False}),
                    ("TMA on every grid", {}, {"tma_everywhere": True}),
                    ("8 splits", {}, {"num_kv_splits": 8}), ("16 splits", {}, {"num_kv_splits": 16}),
                    ("32 splits", {}, {"num_kv_splits": 32}),
                    ("64 splits", {}, {"num_kv_splits": 64}),
                    ("shape tiles", {}, {"small_grid_tiles": False}),
                    ("pages prefetched", {"JK_SD_PAGES_AT_ISSUE": 0}, {}),
                    ("pipeline page slots", {"JK_SD_THREAD_PAGES": 0}, {})]
    base_tiling = sda.pick_tiling
    base_on_grid = sda.tma_on_grid
    if only_variants:
        named = {v[0]: v for v in variants_all}
        for want in only_variants:   # "tile QxS": query tile Q in S splits (the op's tiling forced)
            for part in want.split("+"):
                if part.startswith("tile ") and part not in named:
                    q, s = (int(x) for x in part[5:].split("x"))
                    named[part] = (part, {}, {"tiling": (q, s)})
        # "a+b": the variants a and b together (their macros and overrides merged)
        variants_all = [variants_all[0]] + [
            (want, {k: v for part in want.split("+") for k, v in named[part][1].items()},
             {k: v for part in want.split("+") for k, v in named[part][2].items()})
            for want in only_variants]
    fams = {}
    call_kw = {}   # op keyword arguments of the current variant (num_kv_splits)

    def user(tag, mac, over):
        fam = base if not mac else fams.setdefault(tag, derived(base, tag.replace(" ", "_"), mac))
        over = dict(over)
        pdl = over.pop("merge_pdl", True)   # the merge kernel's programmatic launch (op switch)
        tma = over.pop("kv_tma", True)      # tensor-map K/V loads where they apply (op switch)
        tma_everywhere = over.pop("tma_everywhere", False)   # where the op keeps cp.async too
        kw = {k: over.pop(k) for k in ("num_kv_splits",) if k in over}
        tiling = over.pop("tiling", None)
        small_tiles = over.pop("small_grid_tiles", True)   # pick_tiling's small-grid tiles

        def config(*a, **k):
            cfg = dict(base_config(*a, **k), **over)
            if cfg.get("kv_tma") and not tma_shape(cfg):   # (kv_tile 128 on warpgroup tiles)
                del cfg["kv_tma"]
            return tuple(cfg.items())

        def use():
            sda.SPEC_DEC_ATTENTION = fam
            sda.kernel_config = config
            sda.MERGE_PDL = pdl
            sda.KV_TMA = tma
            sda.tma_on_grid = ((lambda grids, *a: grids != "none") if tma_everywhere
                               else base_on_grid)
            sda.pick_tiling = (lambda *a, **k: tiling) if tiling else base_tiling
            sda.SMALL_GRID_TILES = small_tiles
            sda._LAUNCH.clear()
            sda._PLANS.clear()   # (the plan holds the kv_tma choice)
            call_kw.clear()
            call_kw.update(kw)
        return use

    have_xqa = importlib.util.find_spec("flashinfer") is not None   # the XQA line of each row
    print("\n## spec-dec attention (page 64 and NHD unless named); % of read bandwidth")
    print("| row | variant | us | % read | vs default |\n|---|---|---|---|---|")
    rows = (((32, 8, 128), 1, 8192, 64, "bf16"), ((32, 8, 128), 4, 8192, 64, "bf16"),
            ((32, 8, 128), 1, 32768, 8, "bf16"), ((32, 8, 128), 4, 32768, 8, "bf16"),
            ((64, 8, 128), 1, 8192, 64, "bf16"), ((16, 16, 64), 1, 8192, 64, "bf16"),
            ((16, 16, 64), 16, 8192, 64, "bf16"), ((8, 4, 256), 1, 8192, 64, "bf16"),
            ((32, 8, 128), 1, 8192, 8, "bf16"), ((32, 8, 128), 1, 8192, 1, "bf16"),
            ((32, 8, 128), 4, 8192, 1, "bf16"), ((32, 8, 128), 16, 8192, 8, "bf16"),
            ((32, 8, 128), 1, 8192, 64, "fp8"), ((32, 8, 128), 4, 8192, 64, "fp8"),
            ((32, 8, 128), 1, 8192, 8, "fp8"), ((32, 8, 128), 4, 8192, 8, "fp8"),
            ((32, 8, 128), 16, 8192, 8, "fp8"), ((32, 8, 128), 64, 8192, 8, "fp8"),
            ((32, 8, 128), 1, 8192, 64, "bf16", "HND"), ((16, 16, 64), 1, 8192, 64, "bf16", "HND"),
            ((32, 8, 128), 16, 8192, 64, "bf16"), ((32, 8, 128), 64, 8192, 64, "bf16"),
            ((32, 8, 128), 64, 8192, 8, "bf16"), ((32, 8, 128), 64, 8192, 1, "bf16"),
            ((32, 8, 128), 64, 8192, 64, "fp8"), ((32, 8, 128), 16, 8192, 64, "fp8"),
            ((8, 1, 128), 64, 8192, 64, "bf16"), ((16, 16, 64), 64, 8192, 64, "bf16"),
            ((64, 8, 128), 16, 8192, 64, "bf16"), ((8, 4, 256), 64, 8192, 64, "bf16"),
            ((8, 4, 256), 64, 8192, 1, "bf16"), ((8, 4, 256), 16, 8192, 64, "bf16"),
            ((32, 8, 128), 16, 1024, 8, "fp8"), ((32, 8, 128), 16, 8192, 1, "fp8"),
            ((32, 8, 128), 16, 32768, 8, "fp8"), ((32, 8, 128), 64, 1024, 1, "fp8"),
            ((32, 8, 128), 64, 8192, 1, "fp8"), ((32, 8, 128), 64, 32768, 8, "fp8"),
            ((8, 4, 256), 16, 8192, 64, "fp8"), ((8, 4, 256), 64, 8192, 8, "fp8"),
            ((32, 8, 128), 64, 1024, 1, "bf16"), ((32, 8, 128), 64, 1024, 8, "bf16"),
            ((16, 16, 64), 64, 8192, 1, "bf16"), ((8, 1, 128), 64, 8192, 1, "bf16"),
            ((8, 1, 128), 16, 8192, 1, "bf16"), ((32, 8, 128), 16, 32768, 1, "bf16"),
            ((64, 8, 128), 64, 8192, 1, "bf16"),
            ((32, 8, 128), 16, 1024, 1, "bf16"), ((32, 8, 128), 16, 8192, 1, "bf16"),
            ((32, 8, 128), 16, 32768, 1, "fp8"), ((32, 8, 128), 16, 1024, 8, "bf16"),
            ((64, 8, 128), 16, 8192, 1, "bf16"), ((32, 8, 128), 64, 32768, 64, "bf16"),
            ((32, 8, 128), 16, 32768, 8, "bf16"), ((8, 1, 128), 1, 8192, 1, "bf16"),
            ((16, 16, 64), 16, 8192, 1, "bf16"), ((8, 1, 128), 4, 8192, 1, "bf16"),
            ((16, 16, 64), 1, 8192, 1, "bf16"), ((64, 8, 128), 1, 8192, 1, "bf16"),
            ((32, 8, 128), 4, 32768, 1, "bf16"), ((32, 8, 128), 1, 1024, 1, "bf16"),
            ((32, 8, 128), 4, 1024, 8, "bf16"), ((8, 4, 256), 1, 8192, 1, "bf16"),
            ((32, 8, 128), 1, 32768, 1, "fp8"), ((32, 8, 128), 64, 1024, 8, "fp8"),
            ((32, 8, 128), 64, 32768, 1, "fp8"), ((32, 8, 128), 1, 8192, 1, "fp8"),
            ((32, 8, 128), 4, 8192, 1, "fp8"), ((32, 8, 128), 4, 32768, 1, "fp8"),
            ((32, 8, 128), 4, 1024, 1, "fp8"), ((32, 8, 128), 4, 1024, 8, "fp8"),
            ((32, 8, 128), 1, 32768, 8, "fp8"), ((32, 8, 128), 4, 32768, 64, "fp8"),
            ((32, 8, 128), 4, 32768, 8, "fp8"), ((32, 8, 128), 16, 1024, 1, "fp8"))
    if match:   # the named rows, in the order named (any shape, not only the list above)
        rows = [parse_row(m) for m in match]
    for (hq, hkv, d), n, ctx, batch, kvn, *named in rows:
        layout = named[0] if named else "NHD"
        page = named[1] if len(named) > 1 else 64
        kv_dtype = torch.float8_e4m3fn if kvn == "fp8" else torch.bfloat16
        variants = [(tag, user(tag, mac, over)) for tag, mac, over in variants_all]
        draft = sb.chain_parents(n) if n <= 4 else sb.random_eagle_tree(n, random.Random(n))
        kv_bytes = batch * ctx * hkv * d * 2 * (1 if kvn == "fp8" else 2)
        copies = max(1, min(16, math.ceil(sb.L2_DEFEAT_BYTES / kv_bytes)))
        sets = [sb.build(batch, hq, hkv, d, ctx - n, draft, kv_dtype, page, layout, seed=s)
                for s in range(copies)]
        outs = [torch.empty_like(s["q"]) for s in sets]
        name = row_name((hq, hkv, d), n, ctx, batch, kvn, layout, page)
        variants[0][1]()
        plan = dict(zip(sda.OP_ARGS, sda.prepare(**sets[0], out=outs[0])))
        print(f"<!-- {name}: the op's tiling {plan['q_tile']}x{plan['num_splits']} -->", flush=True)
        ab(name, variants,
           lambda: [(lambda s=s, o=o: sda.spec_dec_attention(**s, out=o, **call_kw))
                    for s, o in zip(sets, outs)],
           sb.time_graph, kv_bytes, rbw)
        # every variant that does the arithmetic must give the default's output, bit for bit
        # (fp8_qk: within its e4m3 accumulation error; the difference is printed either way)
        ref = None
        for tag, use in variants:
            if "load-only" in tag or "empty" in tag:
                continue
            use()
            o = torch.full_like(sets[0]["q"], float("nan"))
            try:
                sda.spec_dec_attention(**sets[0], out=o, **call_kw)
            except Exception:   # reported by ab
                continue
            if ref is None:
                ref = o
            else:
                diff = (o.float() - ref.float()).abs().max().item()
                print(f"<!-- {name} {tag}: max |diff| vs default {diff:.3g}, "
                      f"nan {bool(o.isnan().any())} -->", flush=True)
        if have_xqa:
            for tag, pdl in (("XQA", None), ("XQA no PDL", False)):
                calls = [sb.xqa_thunk(s, n, hkv, page, enable_pdl=pdl)[0] for s in sets]
                t = sb.time_graph(calls)
                print(f"| {name} | {tag} | {t * 1e6:.1f} | {100 * kv_bytes / t / rbw:.1f}% | |",
                      flush=True)
        sets = outs = calls = None
        torch.cuda.empty_cache()
    sda.SPEC_DEC_ATTENTION, sda.kernel_config, sda.MERGE_PDL = base, base_config, True
    sda.KV_TMA = True
    sda.tma_on_grid = base_on_grid
    sda.pick_tiling = base_tiling
    sda.SMALL_GRID_TILES = True
    sda._LAUNCH.clear()
    sda._PLANS.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("mamba", "attention"))
    ap.add_argument("--tree-only", action="store_true", help="Mamba2: only the tree rows")
    ap.add_argument("--residency", action="store_true",
                    help="Mamba2: fewer resident blocks per SM (padded shared memory)")
    ap.add_argument("--engine", action="store_true",
                    help="Mamba2: engine-mode calls (decode at T = 1, verification above), "
                         "store hint and tiling variants")
    ap.add_argument("--row", action="append", default=[],
                    help="attention: only this row (its printed name; repeatable)")
    ap.add_argument("--variant", action="append", default=[],
                    help="attention: only this variant besides the default (repeatable)")
    args = ap.parse_args()
    print(f"# probe on {torch.cuda.get_device_name()}")
    if args.only != "attention":
        bw = mb.copy_bandwidth() * 1e9
        print(f"# copy {bw / 1e9:.0f} GB/s, write {mb.write_bandwidth():.0f} GB/s")
        if args.engine:
            mamba_engine(bw)
        elif args.residency:
            mamba_residency(bw)
        else:
            mamba(bw, args.tree_only)
    if args.only != "mamba":
        rbw = sb.read_bandwidth()
        print(f"# read {rbw / 1e12:.2f} TB/s")
        attention(rbw, args.row, args.variant)


if __name__ == "__main__":
    main()
