"""Speculative-decoding attention over a paged KV cache: the kernel family (declaration only).

Compile-time parameters (see docs/spec_dec_attention.md): head_dim (a multiple of 16 up to 256;
the source pads it to 64, 128 or 256), input dtype, KV dtype
(the input's 16-bit type or fp8 e4m3), KV layout, page size, mode (decode / chain / tree), the
query tile (rows per CTA: 16 and 32 run mma.sync, 16 rows per warp slab, each KV tile split across
warps; 64 and 128 run warpgroup MMAs on sm_90a, 64 rows per group of four warps, and mma.sync
elsewhere) and whether the split-KV path is compiled in. The family is arch-specific (sm_90a on
H100/H200) for those warpgroup MMAs.

``kv_stages`` (default 0: the source's choice) fixes the K/V pipeline depth instead, and
``kv_tile`` (default 0: the source's choice) the KV positions per stage (64 or 128); shared
memory must stay within 227 KiB. ``fp8_qk`` (default False) computes Q K^T on e4m3 tensor cores
where ``fp8_qk_applies`` (faster on fp8 trees, less precise: see the kernel source and
docs/spec_dec_attention.md). ``kv_tma`` (default False) copies K/V with tensor maps where
``tma_shape`` holds (the op sets it on sm_90+ on the grids ``tma_grids`` names; the attention
entry then needs the caches' maps in ``k_map`` / ``v_map``, jitkern.ops.tensor_map).

Launch contract (the op keeps it): mode "decode" needs one query token per sequence and no
q_cu_seqlens; split_kv=False needs num_splits == 1; with num_splits > 1 the "merge" entry runs
after it (``counters`` is always null: see the kernel's epilogue); dynamic shared memory is
``shared_bytes(config)``.
"""

from __future__ import annotations

from ..family import Entry, IntRange, KernelFamily, Param, register_family

HEAD_DIMS = IntRange(16, 256, multiple_of=16)   # 64/128/256 natively, the rest padded up
PAGE_SIZES = (16, 32, 64, 128)
MODES = ("decode", "chain", "tree")
Q_TILES = (16, 32, 64, 128)
KV_TILE = 64  # the host's unit of KV positions (kv_tiles, split sizing); see kv_tile()

ATTN_SIGNATURE = (
    ("q", "ptr"), ("k_cache", "ptr"), ("v_cache", "ptr"), ("block_tables", "ptr"),
    ("seq_lens", "ptr"), ("q_cu", "ptr"), ("mask", "ptr"), ("out", "ptr"), ("ws_o", "ptr"),
    ("ws_ml", "ptr"), ("counters", "ptr"), ("kv_scale_ptr", "ptr"),
    ("total_q", "i32"), ("hq", "i32"), ("hkv", "i32"), ("group", "i32"), ("q_len", "i32"),
    ("bt_stride", "i32"), ("mask_words", "i32"), ("num_splits", "i32"), ("row_tiles", "i32"),
    ("window", "i32"), ("kv_tiles", "i32"), ("scale_log2", "f32"), ("kv_scale", "f32"),
    ("k_map", "tmap"), ("v_map", "tmap"),   # kv_tma: the caches' tensor maps (else zeros)
)

MERGE_SIGNATURE = (("ws_o", "ptr"), ("ws_ml", "ptr"), ("out", "ptr"), ("rows", "i32"),
                   ("num_splits", "i32"))


MAX_SHARED = 227 * 1024   # dynamic shared memory one CTA may use on sm_90


def _validate(cfg: dict) -> None:
    if cfg["kv_dtype"] != "fp8_e4m3" and cfg["kv_dtype"] != cfg["dtype"]:
        raise ValueError(f"spec_dec_attention: kv_dtype {cfg['kv_dtype']!r} must equal dtype "
                         f"{cfg['dtype']!r} or be 'fp8_e4m3' (tensor-core operands share one type)")
    if cfg.get("kv_tma") and not tma_shape(cfg):
        raise ValueError(f"spec_dec_attention: kv_tma applies to 16-bit caches with a head_dim "
                         f"that is a multiple of 64 and to fp8 caches with a head_dim that is a "
                         f"multiple of 128, with query tiles of 16 or 32 rows, or of 64 or 128 "
                         f"over 64-position KV tiles; got "
                         f"kv_dtype {cfg['kv_dtype']!r}, head_dim {cfg['head_dim']}, q_tile "
                         f"{cfg['q_tile']}, kv_tile {kv_tile(cfg)}")
    if shared_bytes(cfg) > MAX_SHARED:
        # the resolved depth: with kv_stages 0 the overflow comes from kv_tile or head_dim
        raise ValueError(f"spec_dec_attention: kv_stages {stages(cfg)} needs "
                         f"{shared_bytes(cfg)} bytes of shared memory per CTA with head_dim "
                         f"{cfg['head_dim']}, kv_dtype {cfg['kv_dtype']!r}, q_tile "
                         f"{cfg['q_tile']}, kv_tile {kv_tile(cfg)}; at most {MAX_SHARED}")


def pick_q_tile(rows: int) -> int:
    """Query rows per CTA for ``rows = max_q_len * G`` rows per KV head: the smallest tile
    that holds them, else 128 (big trees: 8 warps share each K/V tile across 128 rows). The op
    and the warm-up presets both use this."""
    for qt in Q_TILES:
        if rows <= qt:
            return qt
    return Q_TILES[-1]


def q_tiles_for(rows: int, fp8: bool = False) -> tuple:
    """Every query tile the op may run for ``rows`` rows per KV head (``fp8``: with an fp8
    cache), pick_q_tile's first: 64 beside 128 (a 128-row tile runs as its 64-row half on small
    grids), and on grids with little work per SM the smaller tiles, 16 rows below any larger
    tile and, with an fp8 cache, 32 below 64 and 128 (see
    jitkern.ops.spec_dec_attention.pick_tiling). Warm-up sets use this."""
    qt = pick_q_tile(rows)
    out = [qt]
    if qt == Q_TILES[-1]:
        out.append(qt // 2)
    if fp8 and qt > 32:
        out.append(32)
    if qt > 16:
        out.append(16)
    return tuple(out)


# 64-row tiles of a 16-bit cache at a padded head_dim of 128 run 3 K/V stages instead of the
# source's 2 on small grids (the op's choice, see small_grid_stages): one CTA per SM then holds
# the deeper pipeline (122 KB of shared memory).
SMALL_GRID_STAGES = 3


def small_grid(ctas: int, splits: int, sms: int) -> bool:
    """Whether a launch of ``ctas`` CTAs in ``splits`` KV splits on ``sms`` SMs is a small grid:
    at most one CTA per SM, or at most two of a split (memory-bound) grid. Its CTAs walk few KV
    tiles each, so latency, not issue slots, bounds them (small_grid_stages, and the op's choice
    of kv_tma for the warpgroup tiles)."""
    return ctas <= sms or (splits > 1 and ctas <= 2 * sms)


def small_grid_stages(kv_dtype: str, head_dim: int, q_tile: int, ctas: int, splits: int,
                      sms: int) -> int:
    """``kv_stages`` for a launch of ``ctas`` CTAs in ``splits`` KV splits on ``sms`` SMs (0: the
    source's choice): 3 for 64-row tiles of a 16-bit cache at a padded head_dim of 128 where the
    grid is at most one CTA per SM, or at most two of a split (memory-bound) grid. Measured
    (H200, 32/8/128 trees): 16-node trees 8k batch 1 4.9% faster, 32k batch 1 4.2%, 1k batch 8
    3.3%, 8k batch 8 (two CTAs per SM, 4 splits) 3.7%; 64-node trees at 1k batch 8 (two CTAs per
    SM, unsplit: the compute-heavy case) 19% slower and 16-node trees at batch 64 1% slower, so not
    there; 128-row tiles 25-32% slower and fp8 caches no faster (BENCHMARKS.md)."""
    if _has_small_grid_stages(kv_dtype, head_dim, q_tile) and small_grid(ctas, splits, sms):
        return SMALL_GRID_STAGES
    return 0


def _has_small_grid_stages(kv_dtype: str, head_dim: int, q_tile: int) -> bool:
    """The tiles small_grid_stages deepens: 64 rows of a 16-bit cache at padded head_dim 128."""
    return q_tile == 64 and kv_dtype != "fp8_e4m3" and padded_head_dim(head_dim) == 128


def tma_grids(cfg: dict) -> str:
    """On which grids the op loads K/V with tensor maps (``kv_tma``) for ``cfg``'s tile, on sm_90
    and later: "all", "large" (not small_grid), "crowded" (more CTAs than SMs) or "none"; see
    tma_on_grid. Where tma_shape holds: 16-bit caches in 64-row tiles on large grids and in
    other tiles (16, 32 and 128 rows) on all; fp8 caches in 16- and 32-row tiles on crowded
    grids, in 64-row tiles on large grids and in 128-row tiles on none. Measured (H200,
    BENCHMARKS.md): in load-only kernels of the decode shape (8k, batch 64) the bulk tensor
    copies read 104-106% of the read bandwidth where the 16-byte cp.async copies read 97-100%;
    16-bit trees on large grids ran 1.03-1.30x faster with them (the MMA warps no longer issue
    copies); on small grids, whose CTAs walk few tiles, 64-row tiles ran 0-8% slower (one
    thread's bulk copies and the barrier round trip, against every thread's copies in flight at
    once), 128-row tiles 0.97-1.16x. With an fp8 cache: decode and 4-chains (16-row tiles) at
    batch 64 1.03-1.07x, at 8k and 32k batch 8 (256 CTAs, a small grid but a crowded one)
    1.02-1.06x, on grids of at most one CTA per SM (batch 1, 1k batch 8) 0.83-0.96x (the
    tensor-map pipeline is the CTA's, the cp.async ones are private to each warp; one
    tensor-map pipeline per warp measured slower still); 64-row tiles on large grids 1.00-1.10x;
    128-row tiles 0.95-1.00x.

    Pages of 16 positions cut every box to 16 rows (a box never spans pages): four times the
    copies a tile, issued by one thread. There the 16- and 32-row tiles take tensor maps on
    large grids only with a 16-bit cache (decode at 8k batch 64 1.02x, head_dim 64 1.08x; at 8k
    and 32k batch 8 0.85-0.90x, 8/1/128 16-node trees at batch 1 0.91x) and never with an fp8
    one (decode at 8k batch 64 0.89x). The warpgroup tiles keep the rule above (128-row tiles
    1.03-1.05x on small grids, 1.11-1.16x on large ones; fp8 64-row tiles 1.07x), and so do
    pages of 32 (1.00-1.28x)."""
    if not tma_shape(cfg):
        return "none"
    fp8 = cfg["kv_dtype"] == "fp8_e4m3"
    if cfg["q_tile"] <= 32:
        if cfg.get("page_size", 64) < 32:   # boxes of 16 rows
            return "none" if fp8 else "large"
        return "crowded" if fp8 else "all"
    if cfg["q_tile"] == 64:
        return "large"
    return "none" if fp8 else "all"


def tma_on_grid(grids: str, ctas: int, splits: int, sms: int) -> bool:
    """Whether a launch of ``ctas`` CTAs in ``splits`` KV splits on ``sms`` SMs takes tensor maps
    where tma_grids says ``grids`` for its tile."""
    if grids == "large":
        return not small_grid(ctas, splits, sms)
    if grids == "crowded":
        return ctas > sms
    return grids == "all"


def op_configs(cfg: dict) -> list:
    """The configurations the op may run for a shape's ``cfg`` on sm_90 and later (warm-up sets
    and presets hold them all): ``cfg`` with ``kv_tma`` where tma_grids says so (beside ``cfg``
    itself where some grids keep the cp.async copies), and where small_grid_stages may pick it,
    ``cfg`` with SMALL_GRID_STAGES stages (small grids, so without kv_tma). (Below sm_90 the op
    runs without kv_tma, so those kernels compile on first use.)"""
    grids = tma_grids(cfg)
    if grids == "all":
        return [dict(cfg, kv_tma=True)]
    out = [cfg, dict(cfg, kv_tma=True)] if grids in ("large", "crowded") else [cfg]
    if _has_small_grid_stages(cfg["kv_dtype"], cfg["head_dim"], cfg["q_tile"]):
        out.append(dict(cfg, kv_stages=SMALL_GRID_STAGES))
    return out


def padded_head_dim(head_dim: int) -> int:
    """The kernel's head dim for a tensor head_dim (mirrors D in the source): 64, 128 or 256.
    The padded columns are zeros in shared memory; memory traffic stays that of head_dim."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def warps(q_tile: int) -> int:
    """Warps per CTA for a query tile (mirrors NWARPS in the source): 8 for tiles of 64 rows
    and more (16-row slabs, two warps per slab where there are only 4), else 4."""
    return max(8, q_tile // 16) if q_tile >= 64 else 4


def kv_tile(cfg: dict) -> int:
    """KV positions per pipeline stage (mirrors TILE in the source): ``kv_tile``, or 64 when 0
    (128 measured no faster for fp8 decode and chains; BENCHMARKS.md)."""
    return cfg.get("kv_tile", 0) or 64


def stages(cfg: dict) -> int:
    """K/V pipeline depth (mirrors STAGES in the source): ``kv_stages``, or when 0 about 128 KB
    of K/V in flight per SM for memory-bound (small) query tiles, 2 for trees and 32 KB (K)
    stages, 3 for 64-row tiles of 8 KB 16-bit stages (head_dim 64 trees)."""
    if cfg.get("kv_stages", 0):
        return cfg["kv_stages"]
    kvb = 1 if cfg["kv_dtype"] == "fp8_e4m3" else 2
    kb = padded_head_dim(cfg["head_dim"]) * kvb * kv_tile(cfg) // 1024
    if cfg["q_tile"] >= 64:
        return 3 if (cfg["q_tile"] == 64 and kvb == 2 and kb <= 8) else 2
    return 2 if kb >= 32 else (5 if kb <= 8 else 3)


def tma_shape(cfg: dict) -> bool:
    """Whether ``kv_tma`` may be set (mirrors TMA in the source, on sm_90 and later): a head_dim
    that fills whole 128-byte boxes (a multiple of 64 for a 16-bit cache, of 128 for an fp8
    one; padded head dims keep the cp.async copies) and a query tile of 16 or 32 rows (the
    memory-bound tiles) or a warpgroup tile (64 or 128 rows over 64-position KV tiles,
    wgmma_shape; sm_90a)."""
    whole_boxes = cfg["head_dim"] % (128 if cfg["kv_dtype"] == "fp8_e4m3" else 64) == 0
    return whole_boxes and (cfg["q_tile"] <= 32 or wgmma_shape(cfg))


def tma_box_rows(cfg: dict) -> int:
    """KV positions per tensor-map box of ``cfg`` (mirrors TMA_BOX_ROWS in the source): a page,
    or the rows one K/V pipeline copies of a larger page, a whole kv_tile except in 64-row tiles,
    whose two warpgroups copy a half each."""
    tile = kv_tile(cfg)
    return min(cfg["page_size"], tile // 2 if cfg["q_tile"] == 64 else tile)


def wgmma_shape(cfg: dict) -> bool:
    """Whether a configuration runs warpgroup MMAs on sm_90a (mirrors WG_SHAPE in the source):
    query tiles of 64 or 128 rows, 64-position KV tiles. Its shared memory (1024-byte alignment
    slack, fp8 conversion tiles) is sized the same on every target."""
    return cfg["q_tile"] >= 64 and kv_tile(cfg) == 64


def shared_bytes(cfg: dict) -> int:
    """Dynamic shared memory of one CTA; mirrors SMEM_BYTES in the source. With ``kv_tma`` the
    larger of the two layouts: below sm_90 the source compiles the cp.async one instead."""
    if cfg.get("kv_tma"):
        return max(_shared_bytes(cfg, True), _shared_bytes(cfg, False))
    return _shared_bytes(cfg, False)


def _shared_bytes(cfg: dict, tma: bool) -> int:
    d, qt = padded_head_dim(cfg["head_dim"]), cfg["q_tile"]
    kvb = 1 if cfg["kv_dtype"] == "fp8_e4m3" else 2
    wm = qt // 16
    wn = warps(qt) // wm
    kv_row = d * kvb + (0 if tma else 16)   # TMA tiles are dense (swizzled)
    stages_ = stages(cfg)
    tile = kv_tile(cfg)
    pipe = stages_ * 2 * tile * kv_row
    wg_shape = wgmma_shape(cfg)
    if kvb == 1 and (qt >= 128 or wg_shape):   # the tile's K and V converted to fp16 rows
        pipe += 2 * tile * (d * 2 + 16)
    epi = (wn * qt * (d + 4) + 2 * wn * qt) * 4
    q_bytes = qt * (d + 8) * 2
    kv_off = -(-q_bytes // 1024) * 1024 if tma else q_bytes   # TMA tiles start 1024-aligned
    return kv_off + max(pipe, epi) + (1024 if wg_shape or tma else 0)


def fp8_qk_applies(dtype: str, kv_dtype: str, head_dim: int, q_tile: int) -> bool:
    """Whether the op asks for ``fp8_qk``: an fp8 cache with a bf16 query, a padded head_dim of
    128 or 256 (where FP8_QK in the source changes the kernel on sm_90a) and a 64-row tile (the
    source also has it for 128-row tiles, measured no faster there: BENCHMARKS.md). Other calls
    keep the configuration, and the cached kernel, they have without the flag."""
    return (kv_dtype == "fp8_e4m3" and dtype == "bf16" and q_tile == 64
            and padded_head_dim(head_dim) in (128, 256))


def resident_ctas(cfg: dict, smem_per_sm: int, regs_per_sm: int = 65536) -> int:
    """CTAs of ``cfg`` one SM holds at once, bounded from the source's launch bounds (a CTA
    without a two-CTA bound is assumed to use up to 255 registers a thread) and shared memory
    (1 KiB reserved per CTA)."""
    nt = 32 * warps(cfg["q_tile"])
    small = padded_head_dim(cfg["head_dim"]) <= 128
    min_blocks = 2 if nt >= 256 and small else 3 if cfg["q_tile"] == 16 and small else 1
    # (MIN_BLOCKS in the source)
    by_regs = max(min_blocks, regs_per_sm // (nt * 256))
    by_smem = smem_per_sm // (shared_bytes(cfg) + 1024)
    return max(1, min(by_regs, by_smem, 2048 // nt))


SPEC_DEC_ATTENTION = register_family(KernelFamily(
    name="spec_dec_attention",
    source="spec_dec_attention.cu",
    description="speculative-decoding (tree/chain) attention over a paged KV cache, XQA semantics",
    params=(
        Param("head_dim", HEAD_DIMS),
        Param("dtype", ("fp16", "bf16"), macro="JK_IN_BF16", render={"fp16": "0", "bf16": "1"}),
        Param("kv_dtype", ("fp16", "bf16", "fp8_e4m3"), macro="JK_KV_FP8",
              render={"fp16": "0", "bf16": "0", "fp8_e4m3": "1"}),
        Param("kv_layout", ("NHD", "HND"), macro="JK_KV_HND", render={"NHD": "0", "HND": "1"}),
        Param("page_size", PAGE_SIZES),
        Param("mode", MODES, render={"decode": "0", "chain": "1", "tree": "2"}),
        Param("q_tile", Q_TILES),
        Param("split_kv", (False, True), default=True),
        # K/V pipeline depth, 0: the source's choice (see stages()); others for measurements
        Param("kv_stages", (0, 2, 3, 4, 5, 6), default=0),
        # KV positions per stage, 0: the source's choice (64, see kv_tile()); 128 for measurements
        Param("kv_tile", (0, 64, 128), default=0),
        # e4m3 MMAs for S = Q K^T (fp8 cache, bf16 query, 64/128-row tiles, padded head_dim 128
        # or 256 on sm_90a; elsewhere no effect): the op's allow_fp8_qk, see fp8_qk_applies()
        Param("fp8_qk", (False, True), default=False, macro="JK_FP8_QK"),
        # tensor-map (TMA) K/V loads where tma_shape holds, sm_90 and later: the op's choice
        # on the grids tma_grids names
        Param("kv_tma", (False, True), default=False, macro="JK_SD_TMA"),
    ),
    entries={
        "attention": Entry("jk_sd::spec_dec_attention", signature=ATTN_SIGNATURE, packed=True),
        "merge": Entry("jk_sd::spec_dec_merge", signature=MERGE_SIGNATURE, packed=True),
    },
    options=("-std=c++17", "--use_fast_math"),
    arch_specific=True,   # sm_90a: warpgroup MMAs for the large query tiles (wgmma_shape)
    validate=_validate,
    warmup=tuple(
        c
        for kv in ("bf16", "fp8_e4m3")
        for ps in (16, 64)
        # Llama-3-8B (G=4) and 70B-TP8 (G=8), every query tile the op may pick (q_tiles_for)
        # for rows = q_len * G: decode 4/8 rows, 4-chains 16/32, 16-node trees 64/128 and
        # 64-node trees 256/512
        for mode, qt in sorted({(mode, qt) for mode, n in (("decode", 1), ("chain", 4),
                                                           ("tree", 16), ("tree", 64))
                                for g in (4, 8) for qt in q_tiles_for(n * g, kv == "fp8_e4m3")})
        for c in op_configs(dict(head_dim=128, dtype="bf16", kv_dtype=kv, kv_layout="NHD",
                                 page_size=ps, mode=mode, q_tile=qt, split_kv=True))
    ),
))
