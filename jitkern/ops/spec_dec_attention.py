"""``spec_dec_attention``: the verification-pass attention of speculative decoding over a paged
KV cache (chain or tree drafts in XQA's packed mask format). See docs/spec_dec_attention.md.

The public wrapper validates (shapes, dtypes, layouts, devices; values too with
``check_values=True``), picks the specialization (mode, query tile) and the number of KV splits,
and launches; the custom op ``jitkern::spec_dec_attention`` (only the launch) is what
torch.compile traces. Validation and planning run once per call signature: a repeated call binds
its tensors to the cached plan. Nothing on the launch
path allocates while a CUDA graph is being captured: the split-KV workspace is a per-device cached
buffer grown by an uncaptured call (or passed in by the caller).
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch

from ..families.spec_dec_attention import (HEAD_DIMS, KV_TILE, PAGE_SIZES, SPEC_DEC_ATTENTION,
                                           fp8_qk_applies, pick_q_tile, q_tiles_for,
                                           resident_ctas, shared_bytes, small_grid_stages,
                                           tma_box_rows, tma_grids, tma_on_grid, warps)
from ..service import get_kernel
from ..torch_ops import custom_op
from .device import capability, device_index, sm_count
from .signature import PlanCache, contiguous_meta as _meta, require_aligned
from .tensor_map import fits_tensor_map, paged_kv_map

_IN_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_KV_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3"}
_LOG2E = 1.4426950408889634
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 2          # a split reads at least 128 positions
SPLIT_TILES_D128 = 8             # memory-bound tiles: a split reads ~512 positions at D = 128
MIN_SPLIT_GRID_SHARE = 4         # ... but memory-bound splits fill at least 1/4 of the SMs
MEMORY_BOUND_Q_TILE = 32         # query tiles up to this are memory bound (decode, chains)
SHORT_CONTEXT_TILES = 32         # trees: no split in two below this many KV tiles (2k positions)
LONG_CONTEXT_TILES = 64          # trees from this many KV tiles (4k positions) on: a split does
TREE_SPLIT_WORK = 8              # ... at least this many (64-position tile x 64-row) units
TREE_MIN_GRID_SHARE = 2          # ... unless that leaves the grid under 1/2 of the SMs
LONG_SPLIT_TILES = 64            # 64-row tree splits this long keep two CTAs per SM (see below),
FP8_LONG_SPLIT_TILES = 8         # ... with an fp8 cache (more arithmetic a byte) this long
WORKSPACE_CAP_BYTES = 256 << 20  # splits are reduced before the workspace would outgrow this
# Query tiles by the work per SM (pick_tiling): up to SMALL_TILE_WORK units (64 query rows x 64
# KV positions x head_dim 128) an SM, 16-row tiles; with an fp8 cache up to FP8_MID_TILE_WORK,
# 32-row ones; up to HALF_TILE_WORK a 128-row tile runs as its 64-row half.
SMALL_TILE_WORK = 2
FP8_MID_TILE_WORK = 4
HALF_TILE_WORK = 16
SPLIT_COST = 0.1                 # small tiles' splits: the cost of one more split, in KV tiles
SMALL_GRID_TILES = True          # that choice; off: the shape's tile (a switch for measurements)
# Split partials are merged by a second kernel, which spreads the rows over the whole GPU (a merge
# by the last CTA of each group, once used for 16-row tiles, ran 1.08-1.5x slower: its L2 round
# trips are one CTA's chain; BENCHMARKS.md).
MERGE_THREADS = 128   # the merge kernel's block: a thread per row and four head-dim elements
# The merge kernel is a programmatic dependent launch (compute capability 9.0 and later): the
# attention CTAs trigger it after their tile loop, its CTAs take SM slots while the attention grid
# finishes and wait for it in the kernel, which hides most of the merge's launch (JK_SD_PDL in
# the source). A switch for measurements (benchmarks/probe_cache_hints.py).
MERGE_PDL = True
# Tensor-map (TMA) K/V loads where the family's tma_grids has them (compute capability 9.0 and
# later; kv_tma in the family, use_tma below). A switch for measurements.
KV_TMA = True


# ---- launch (the custom op) --------------------------------------------------------------------

# (dtype, kv dtype, head_dim, layout, mode, page, q_tile, stages, tile, fp8_qk, kv_tma, device
# index) ->
# (kernel, smem bytes, threads, merge as a programmatic launch, tensor-map box rows): keyed on the
# raw values, so a launch builds no configuration
_LAUNCH: dict = {}
# (k address, v address, cache shape, cache dtype, layout, box rows) -> (k map, v map): the maps
# of a launch, encoded once per pair of caches and found with one lookup a call; a few pairs (per
# layer group) in turn, cleared when full
_KV_MAPS: dict = {}
_MAX_KV_MAPS = 64


def kernel_config(dtype, kv_dtype, head_dim, kv_layout, mode, page_size, q_tile,
                  kv_stages: int = 0, kv_tile: int = 0, fp8_qk: bool = False,
                  kv_tma: bool = False) -> tuple:
    """The family configuration (item tuple) a call runs; ``kv_stages``, ``kv_tile``,
    ``fp8_qk`` and ``kv_tma`` only when they are not the default (0, 0, False, False)."""
    cfg = (("dtype", _IN_DTYPES[dtype]), ("head_dim", head_dim), ("kv_dtype", _KV_DTYPES[kv_dtype]),
           ("kv_layout", kv_layout), ("mode", mode), ("page_size", page_size), ("q_tile", q_tile),
           ("split_kv", True))
    if kv_stages:
        cfg += (("kv_stages", kv_stages),)
    if kv_tile:
        cfg += (("kv_tile", kv_tile),)
    if fp8_qk:
        cfg += (("fp8_qk", True),)
    return cfg + (("kv_tma", True),) if kv_tma else cfg


def use_tma(kv_dtype: str, head_dim: int, q_tile: int, capability: tuple, ctas: int,
            splits: int, sms: int, page_size: int = 64) -> bool:
    """Whether a call of ``ctas`` CTAs (``splits`` KV splits) on ``sms`` SMs loads K/V with tensor
    maps (``kv_tma``): on compute capability 9.0 and later, on the grids the family's tma_grids
    names for the tile and page size (family tma_on_grid)."""
    if not KV_TMA or capability < (9, 0):
        return False
    grids = tma_grids(dict(kv_dtype=kv_dtype, head_dim=head_dim, q_tile=q_tile,
                           page_size=page_size))
    return tma_on_grid(grids, ctas, splits, sms)


def _launcher(key: tuple):
    hit = _LAUNCH.get(key)
    if hit is None:
        conf = dict(kernel_config(*key[:-1]))
        kern = get_kernel(SPEC_DEC_ATTENTION, conf, key[-1])
        pdl = MERGE_PDL and capability(torch.device("cuda", key[-1])) >= (9, 0)
        hit = _LAUNCH[key] = (kern, shared_bytes(conf), 32 * warps(conf["q_tile"]), pdl,
                              tma_box_rows(conf))
    return hit


def _launch(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, kv_scale_t,
            out, workspace, scale, kv_scale, kv_layout, mode, q_tile, page_size, q_len,
            row_tiles, num_splits, window, kv_tiles, kv_stages, kv_tile, fp8_qk, kv_tma) -> None:
    """Launch only: arguments were validated and resolved by ``spec_dec_attention``
    (``kv_tiles``: 64-position KV tiles of the longest sequence, bounding the split ranges;
    ``kv_stages`` / ``kv_tile``: pipeline depth / positions per stage, 0 = the source's choice,
    others for measurements; ``fp8_qk``: e4m3 Q K^T, set only where it applies; ``kv_tma``:
    tensor-map K/V loads, likewise)."""
    kp, vp = k_cache.data_ptr(), v_cache.data_ptr()
    if kp % 16 or vp % 16:   # (the copies move 16-byte pieces)
        require_aligned("k_cache", k_cache)
        require_aligned("v_cache", v_cache)
    total_q, hq, d = q.shape
    hkv = k_cache.shape[2] if kv_layout == "NHD" else k_cache.shape[1]
    bt = seq_lens.shape[0]
    kern, smem, threads, merge_pdl, box = _launcher((q.dtype, k_cache.dtype, d, kv_layout, mode,
                                                     page_size, q_tile, kv_stages, kv_tile,
                                                     fp8_qk, kv_tma, q.get_device()))
    k_map = v_map = None
    if kv_tma:
        mkey = (kp, vp, k_cache.shape, k_cache.dtype, kv_layout, box)
        maps = _KV_MAPS.get(mkey)
        if maps is None:
            if len(_KV_MAPS) >= _MAX_KV_MAPS:
                _KV_MAPS.clear()
            maps = _KV_MAPS[mkey] = (paged_kv_map(k_cache, kv_layout, box),
                                     paged_kv_map(v_cache, kv_layout, box))
        k_map, v_map = maps
    split = num_splits > 1
    rows = total_q * hq
    ws_ml = workspace.data_ptr() + num_splits * rows * d * 4 if split else None
    kern.launch("attention", grid=(row_tiles * hkv, num_splits, bt), block=(threads, 1, 1),
                args=(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, out,
                      workspace if split else None, ws_ml, None,
                      kv_scale_t, total_q, hq, hkv, hq // hkv, q_len, block_tables.shape[1],
                      tree_mask.shape[1] if tree_mask is not None else 0, num_splits, row_tiles,
                      window, kv_tiles, scale * _LOG2E, kv_scale, k_map, v_map),
                shared_mem=smem)
    if split:
        kern.launch("merge", grid=(-(-rows * (d // 4) // MERGE_THREADS), 1, 1),
                    block=(MERGE_THREADS, 1, 1),
                    args=(workspace, ws_ml, out, rows, num_splits), pdl=merge_pdl)


# name -> position of each of the op's arguments in prepare()'s tuple (_launch's parameters)
OP_ARGS = {name: i for i, name in enumerate(inspect.signature(_launch).parameters)}


@custom_op("jitkern::spec_dec_attention", mutates_args=("out", "workspace"))
def _spec_dec_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           q_cu_seqlens: Optional[torch.Tensor], tree_mask: Optional[torch.Tensor],
                           kv_scale_t: Optional[torch.Tensor], out: torch.Tensor,
                           workspace: torch.Tensor, scale: float,
                           kv_scale: float, kv_layout: str,
                           mode: str, q_tile: int, page_size: int, q_len: int, row_tiles: int,
                           num_splits: int, window: int, kv_tiles: int, kv_stages: int,
                           kv_tile: int, fp8_qk: bool, kv_tma: bool) -> None:
    """The launch as a torch custom op (what torch.compile traces; eager calls skip the
    dispatcher and call ``_launch`` directly)."""
    _launch(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, kv_scale_t, out,
            workspace, scale, kv_scale, kv_layout, mode, q_tile, page_size, q_len,
            row_tiles, num_splits, window, kv_tiles, kv_stages, kv_tile, fp8_qk, kv_tma)


# ---- workspace ---------------------------------------------------------------------------------

_WORKSPACE: dict = {}   # device index -> float32 buffer
# Replaced buffers are kept alive: a captured graph may still reference them. Growth at least
# doubles, so the kept ones add up to less than the live one.
_KEEP: list = []


def workspace_floats(total_q: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """float32 elements of the split-KV workspace: partial outputs plus (max, sum) pairs."""
    if num_splits <= 1:
        return 0
    return num_splits * total_q * num_heads * (head_dim + 2)


def _split_bytes(rows_total: int, head_dim: int) -> int:
    """Workspace bytes of one KV split for ``rows_total`` (query token, head) rows (the split
    planners' unit: workspace_floats per split)."""
    return max(1, 4 * workspace_floats(rows_total, 1, head_dim, 2) // 2)


def _workspace_splits(rows_total: int, head_dim: int) -> int:
    """The most splits whose workspace stays within WORKSPACE_CAP_BYTES."""
    return max(1, WORKSPACE_CAP_BYTES // _split_bytes(rows_total, head_dim))


def reserve_workspace(device, floats: int) -> torch.Tensor:
    """Grow the cached workspace of ``device`` (a device or its index) to at least ``floats``
    float32 elements (call before capturing a CUDA graph whose calls need a larger one)."""
    index = device_index(device)
    ws = _WORKSPACE.get(index)
    if ws is not None and ws.numel() >= floats:
        return ws
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"spec_dec_attention: the split-KV workspace ({floats} float32 needed, "
            f"{0 if ws is None else ws.numel()} cached) cannot grow during CUDA graph capture; "
            f"run the same call once before capturing, call reserve_workspace(), or pass workspace=")
    old = 0 if ws is None else ws.numel()
    if ws is not None:
        _KEEP.append(ws)
    ws = torch.empty(max(floats, 2 * old, 1 << 16), dtype=torch.float32,
                     device=torch.device("cuda", index))
    _WORKSPACE[index] = ws
    return ws


_NO_WS: dict = {}   # device index -> placeholder


def _empty_ws(index: int) -> torch.Tensor:
    """A 1-element placeholder for the workspace of an unsplit call on device ``index``."""
    t = _NO_WS.get(index)
    if t is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("spec_dec_attention: call once before CUDA graph capture")
        t = _NO_WS[index] = torch.zeros(1, dtype=torch.int32, device=torch.device("cuda", index))
    return t


# ---- choices -----------------------------------------------------------------------------------

_OCCUPANCY: dict = {}   # (device, head_dim, q_tile, kv bytes) -> (SMs, CTAs resident per SM)


def _occupancy(device, head_dim: int, q_tile: int, kv_bytes: int) -> tuple:
    """(SMs of the device, CTAs of the specialization one SM holds at once)."""
    key = (device, head_dim, q_tile, kv_bytes)
    hit = _OCCUPANCY.get(key)
    if hit is None:
        import cupy

        index = device_index(device)
        sms = sm_count(device)
        # cudaDevAttrMaxSharedMemoryPerMultiprocessor
        smem = cupy.cuda.runtime.deviceGetAttribute(81, index)
        cfg = dict(head_dim=head_dim, q_tile=q_tile,
                   kv_dtype="fp8_e4m3" if kv_bytes == 1 else "bf16")
        hit = _OCCUPANCY[key] = (sms, resident_ctas(cfg, smem))
    return hit


def pick_num_splits(ctas: int, max_kv_len: int, sm_count: int, per_sm: int, rows_total: int,
                    head_dim: int, kv_bytes: int, q_tile: int = 16, fp8: bool = False) -> int:
    """KV splits for ``ctas`` (batch x KV heads x row tiles) CTAs on ``sm_count`` SMs holding
    ``per_sm`` CTAs each, never past one wave (a CTA of a second wave doubles the time).

    Memory-bound tiles (q_tile <= MEMORY_BOUND_Q_TILE: decode, chains), as measured on an H200
    with the benchmark's explore mode: with a 16-bit cache one CTA per SM already draws the
    SM's share of bandwidth, so more splits only add partials to merge; with an fp8 cache
    (more work per byte) ``per_sm`` CTAs per SM pay off while each split still reads >= 16
    tiles; and a split reads about 512 positions at D = 128 or more (the same bytes at other
    head dims; 8 splits always allowed, and enough for a quarter of the SMs: 8/1/128 at 8k batch
    1, one KV head, 16 splits of 512 positions against 32 of 256: decode 11.5 us against 10.8,
    4-chains 14.7 against 13.4), short splits being mostly fixed cost; their partials'
    traffic (written and read back) stays within the K/V bytes ``kv_bytes`` (an upper
    estimate). Compute-bound tiles (trees) fill every resident CTA, whatever the partials cost
    (measured, H200, 64-node trees at batch 1: the traffic cap held 8/1/128 at 8k to 7 splits,
    52.2 us, against 23.7 us at 32, and 32/8/128 at 1k to 1 split, 45.3 us, against 19.8 at 8);
    but a split in two of a short context is not worth its merge (32/8/128, 1k, batch 8: 44.8
    us unsplit, 56.3 in two), and over a long context a split does at least TREE_SPLIT_WORK
    units of 64 positions x 64 query rows, unless that leaves the grid under half the SMs
    (8/1/128 16-node trees at 8k batch 1, two 64-row tiles: 15.2 us in 16 splits, 14.0 in 32,
    18.6 in 64) (H200, 8k, batch 1, after the tile loop got faster:
    32/8/128 16-node trees 18.8 us in 16 splits of 8 tiles against 21.1 in 32 of 4; 8/1/128
    64-node trees, 128-row tiles, 20.0 us in 32 splits against 23.7 in 64; the rows already at
    8 or more units a split, 64-node trees of 32/8/128, 64/8/128 and 16/16/64, were fastest
    as they were). 64-row tiles at head_dim >= 128 stop at one CTA per SM unless each split
    would still read LONG_SPLIT_TILES tiles: a second CTA per SM mostly adds partials (H200,
    32/8/128 16-node trees: 32k batch 1 43.6 us in 16 splits against 47.0 in 32; 1k batch 1,
    64-node trees in 64-row tiles, 14.2 us in 4 splits against 15.8 in 8; 8k batch 8 the same
    in 2 or 4; but 32k batch 8, 128 tiles a split, 258.8 us in 4 against 267.6 in 2); with an
    fp8 cache from FP8_LONG_SPLIT_TILES (fp8 16-node trees lost 8-11% in one CTA per SM at 32k
    batch 1 and 8k batch 8, 15-32 tiles a split; 1k batch 1, 2 tiles, gained 9%). Always:
    at least MIN_TILES_PER_SPLIT tiles a split, the workspace capped; then trimmed to the
    fewest splits with the same tiles each."""
    tiles = -(-max_kv_len // KV_TILE)
    s = sm_count * per_sm // ctas
    memory_bound = q_tile <= MEMORY_BOUND_Q_TILE
    if memory_bound:
        if not fp8 or tiles < 16 * max(s, 1):
            s = sm_count // ctas
        s = min(s, max(tiles // max(1, SPLIT_TILES_D128 * 128 // head_dim), 8,
                       -(-sm_count // (MIN_SPLIT_GRID_SHARE * ctas))))
    elif s == 2 and tiles < SHORT_CONTEXT_TILES:
        s = 1
    elif tiles >= LONG_CONTEXT_TILES:
        s = min(s, max(1, tiles * max(1, q_tile // 64) // TREE_SPLIT_WORK,
                       -(-sm_count // (TREE_MIN_GRID_SHARE * ctas))))
    long_split = FP8_LONG_SPLIT_TILES if fp8 else LONG_SPLIT_TILES
    if not memory_bound and q_tile == 64 and head_dim >= 128 and tiles < long_split * s:
        s = min(s, max(1, sm_count // ctas))
    if s <= 1:
        return 1
    by_len = max(1, tiles // MIN_TILES_PER_SPLIT)
    by_ws = _workspace_splits(rows_total, head_dim)
    by_traffic = (max(1, kv_bytes // (2 * _split_bytes(rows_total, head_dim))) if memory_bound
                  else by_ws)
    s = max(1, min(s, by_len, by_traffic, by_ws, MAX_SPLITS))
    return -(-tiles // -(-tiles // s))


def pick_tiling(rows: int, bt: int, hkv: int, max_kv_len: int, rows_total: int, head_dim: int,
                kv_elem_bytes: int, fp8: bool, occupancy) -> tuple:
    """(query tile, KV splits) for ``rows`` query rows per KV head, ``bt`` sequences and ``hkv``
    KV heads; ``occupancy(q_tile)`` gives (SMs, CTAs one SM holds).

    The tile follows the work an SM gets, in units of 64 query rows x 64 KV positions x head_dim
    128. A call's time is about a fixed cost per CTA (launch, query, epilogue, merge) plus its
    share of KV tiles, and the larger the tile the larger its fixed cost and the smaller its
    cost per unit. Fitted on an H200 (32/8/128 fp8 16-node trees, batch 1, one CTA per SM):
    16-row tiles about 6.2 us + 2.5 us a unit, 32-row 7.9 + 1.6, 64-row (warpgroup MMAs) 10.2 +
    1.3. So on small grids with little work the small tiles win, and from a few units an SM the
    shape's tile:
    - up to SMALL_TILE_WORK units, 16-row tiles (split as small_tile_splits says);
    - with an fp8 cache, up to FP8_MID_TILE_WORK units, 32-row tiles (likewise; fp8 64-row
      tiles convert K/V in shared memory, a cost per tile the direct path has not);
    - up to HALF_TILE_WORK, a 128-row tile's 64-row half (pick_num_splits for both);
    - else the shape's tile (the first of q_tiles_for), except that a 128-row tile whose grid,
      split as pick_num_splits allows, stays under one CTA per SM runs as its 64-row half: row
      tiles are cheaper parallelism than splits (no partials to merge; the extra K/V reads hit
      L2).
    Measured (H200, every tile in 1-32 splits, BENCHMARKS.md): over 89 rows (trees and chains,
    1k-32k, batch 1-64, bf16 and fp8, five shapes) the choice was the fastest measured on 76
    and at most 15% from it; the 50 rows whose tiling it changed ran 1.01-1.38x faster (e.g.
    32/8/128 fp8 16-node trees at 1k batch 1 8.7 us in 16-row tiles against 10.8 in 64-row
    ones; 64/8/128 16-node trees at 1k batch 8 20.7 in 64-row tiles against 28.3 in 128-row
    ones); 18 rows measured after the fit 0.99-1.31x. The 128-row half was measured before:
    32/8/128 64-node trees at 1k batch 1 14.2 us against 16.7; grids of one CTA per SM or more
    (8k batch 1 of 32/8/128, 64/8/128) keep 128-row tiles."""
    kv_bytes = bt * max_kv_len * hkv * head_dim * 2 * kv_elem_bytes

    def split(q_tile):
        ctas = bt * hkv * -(-rows // q_tile)
        sms, per_sm = occupancy(q_tile)
        splits = pick_num_splits(ctas, max_kv_len, sms, per_sm, rows_total, head_dim, kv_bytes,
                                 q_tile, fp8)
        return splits, ctas * splits >= sms

    tiles = q_tiles_for(rows, fp8)
    shape_tile = tiles[0]
    if SMALL_GRID_TILES and shape_tile > 16:
        sms = occupancy(shape_tile)[0]
        kv_tiles = -(-max_kv_len // KV_TILE)
        work = bt * hkv * rows * kv_tiles * head_dim / (64 * 128 * sms)   # 64-row x tile units
        # (q_tiles_for lists the smaller tiles this may take: 32 rows only with an fp8 cache)
        small = (16 if work <= SMALL_TILE_WORK else
                 32 if work <= FP8_MID_TILE_WORK and 32 in tiles[1:] else 0)
        if small:
            sms, per_sm = occupancy(small)
            return small, small_tile_splits(small, bt * hkv * -(-rows // small), kv_tiles, sms,
                                            per_sm, rows_total, head_dim)
        if shape_tile == 128 and work <= HALF_TILE_WORK:
            return 64, split(64)[0]
    splits, fills = split(shape_tile)
    if fills or shape_tile != 128:
        return shape_tile, splits
    return 64, split(64)[0]


def small_tile_splits(q_tile: int, ctas: int, kv_tiles: int, sm_count: int, per_sm: int,
                      rows_total: int, head_dim: int) -> int:
    """KV splits of pick_tiling's small tiles (16 or 32 rows, smaller than the shape's) for
    ``ctas`` CTAs over ``kv_tiles`` 64-position tiles: among splits of at least
    MIN_TILES_PER_SPLIT tiles, the count that minimizes a split's KV
    tiles times the CTAs an SM then runs (over one), plus SPLIT_COST tiles a split (its share
    of the merge and the CTA's fixed cost), up to ``per_sm`` CTAs per SM for 16-row tiles and
    one for 32-row ones. Fitted on the H200's measurements of 1-64 splits (BENCHMARKS.md): over
    72 rows of 16-row tiles 0.35% slower than the best measured count on average (worst 8%),
    over 28 fp8 rows of 32-row tiles 0.07% (worst 2%), where the memory-bound rule of
    pick_num_splits lost up to 1.5x. The workspace caps it as in pick_num_splits."""
    cap = sm_count * (per_sm if q_tile == 16 else 1)
    most = min(kv_tiles // MIN_TILES_PER_SPLIT, _workspace_splits(rows_total, head_dim), MAX_SPLITS)
    best, best_cost = 1, math.inf
    for s in range(1, most + 1):
        per_split = -(-kv_tiles // s)
        if -(-kv_tiles // per_split) != s or (s > 1 and ctas * s > cap):
            continue   # (the same tiles a split as a smaller count; past the cap)
        cost = per_split * max(1.0, ctas * s / sm_count) + SPLIT_COST * s
        if cost < best_cost:
            best, best_cost = s, cost
    return best


# ---- validation --------------------------------------------------------------------------------

def _tensor(name, t, dtypes, ndim, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {what}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")


_INT32 = (torch.int32,)


def prepare(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor,
            q_cu_seqlens: torch.Tensor | None = None,
            tree_mask: torch.Tensor | None = None, scale: float | None = None,
            kv_scale: float | torch.Tensor | None = None, kv_layout: str = "NHD",
            sliding_window: int | None = None, out: torch.Tensor | None = None, *,
            max_q_len: int | None = None, max_seq_len: int | None = None,
            num_kv_splits: int | None = None, workspace: torch.Tensor | None = None,
            allow_fp8_qk: bool = False, check_values: bool = False) -> tuple:
    """Validate and resolve the arguments of ``spec_dec_attention`` (which see) into the
    custom op's argument tuple (positions by name: OP_ARGS). Raises TypeError/ValueError naming
    the argument."""
    plan = _plan(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, scale,
                 kv_scale, kv_layout, sliding_window, out, max_q_len, max_seq_len, num_kv_splits,
                 workspace, allow_fp8_qk, check_values)
    return plan.bind(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask,
                     kv_scale, out, workspace)


def _plan(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, scale, kv_scale,
          kv_layout, sliding_window, out, max_q_len, max_seq_len, num_kv_splits, workspace,
          allow_fp8_qk, check_values) -> "_Plan":
    """The checks and decisions of a call: everything that depends on its signature alone."""
    _tensor("q", q, _IN_DTYPES, 3, "float16 or bfloat16")
    total_q, hq, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"q: head_dim {d} is not supported; supported: {HEAD_DIMS} (64, 128 "
                         f"and 256 natively, the others padded up to the next of them)")
    if hq == 0:
        raise ValueError("q: number of heads must be positive")
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    _tensor("k_cache", k_cache, _KV_DTYPES, 4, "float16, bfloat16 or float8_e4m3fn")
    _tensor("v_cache", v_cache, _KV_DTYPES, 4, "float16, bfloat16 or float8_e4m3fn")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache dtype {v_cache.dtype} must equal k_cache dtype {k_cache.dtype}")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not fp8 and k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} must equal q dtype {q.dtype} "
                        f"(or be float8_e4m3fn)")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape "
                         f"{tuple(k_cache.shape)}")
    if kv_layout == "NHD":
        num_pages, page_size, hkv, dk = k_cache.shape
        layout_txt = "[num_pages, page_size, Hkv, D] (NHD)"
    else:
        num_pages, hkv, page_size, dk = k_cache.shape
        layout_txt = "[num_pages, Hkv, page_size, D] (HND)"
    if dk != d:
        raise ValueError(f"k_cache: head_dim {dk} (shape {tuple(k_cache.shape)} as {layout_txt}) "
                         f"must equal q's head_dim {d}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"k_cache: page_size {page_size} (shape {tuple(k_cache.shape)} as "
                         f"{layout_txt}) is not supported; supported: {PAGE_SIZES}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads {hq} must be a multiple of the KV heads {hkv} "
                         f"(k_cache shape {tuple(k_cache.shape)} as {layout_txt})")
    _tensor("block_tables", block_tables, _INT32, 2, "int32")
    _tensor("seq_lens", seq_lens, _INT32, 1, "int32")
    bt = seq_lens.shape[0]
    if bt == 0:
        raise ValueError("seq_lens: the batch must not be empty")
    if block_tables.shape[0] != bt:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, seq_lens has {bt} sequences")
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables: max_pages_per_seq must be positive")
    g = hq // hkv
    uniform = q_cu_seqlens is None
    if uniform:
        if total_q % bt:
            raise ValueError(f"q: total_q {total_q} is not a multiple of the batch {bt}; pass "
                             f"q_cu_seqlens for ragged drafts")
        q_len = total_q // bt
        if max_q_len is not None and max_q_len != q_len:
            raise ValueError(f"max_q_len {max_q_len} must equal total_q / batch = {q_len} "
                             f"without q_cu_seqlens")
    else:
        _tensor("q_cu_seqlens", q_cu_seqlens, _INT32, 1, "int32")
        if q_cu_seqlens.shape[0] != bt + 1:
            raise ValueError(f"q_cu_seqlens must have batch + 1 = {bt + 1} entries, got "
                             f"{q_cu_seqlens.shape[0]}")
        q_len = 0
    if max_q_len is not None and (not isinstance(max_q_len, int) or max_q_len < 1):
        raise ValueError(f"max_q_len must be a positive int, got {max_q_len!r}")
    if tree_mask is not None:
        _tensor("tree_mask", tree_mask, (torch.int32, torch.uint32), 2, "int32 or uint32")
        if tree_mask.shape[0] != total_q:
            raise ValueError(f"tree_mask must have total_q = {total_q} rows, got {tree_mask.shape[0]}")
        w = tree_mask.shape[1]
        longest = q_len if uniform else (max_q_len or min(total_q, 32 * w))
        if w != max(1, math.ceil(longest / 32)):
            raise ValueError(f"tree_mask width {w} must be ceil(max_q_len / 32) = "
                             f"{max(1, math.ceil(longest / 32))} (max_q_len {longest})")
        if sliding_window is not None:
            raise ValueError("sliding_window is supported in chain mode only (tree_mask is set)")
    else:
        longest = q_len if uniform else (max_q_len or total_q)
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    kv_scale_t = None
    kv_scale_f = 1.0
    if kv_scale is not None:
        if not fp8:
            raise ValueError(f"kv_scale is the dequantization scale of an fp8 cache; the cache is "
                             f"{k_cache.dtype}")
        if isinstance(kv_scale, torch.Tensor):
            if kv_scale.dtype != torch.float32 or kv_scale.numel() != 1:
                raise ValueError(f"kv_scale tensor must be one float32 element, got dtype "
                                 f"{kv_scale.dtype} with {kv_scale.numel()} elements")
            kv_scale_t = kv_scale
        elif isinstance(kv_scale, (int, float)) and math.isfinite(kv_scale):
            kv_scale_f = float(kv_scale)
        else:
            raise ValueError(f"kv_scale must be a finite float or a float32 tensor, got {kv_scale!r}")
    if out is not None:
        _tensor("out", out, (q.dtype,), 3, str(q.dtype))
        if out.shape != q.shape:
            raise ValueError(f"out shape {tuple(out.shape)} must equal q shape {tuple(q.shape)}")
    mode = "tree" if tree_mask is not None else (
        "decode" if uniform and q_len == 1 and sliding_window is None else "chain")
    max_kv = block_tables.shape[1] * page_size
    if max_seq_len is not None:
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        max_kv = min(max_kv, max_seq_len)
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int)
                                      or not 1 <= num_kv_splits <= 1024):
        raise ValueError(f"num_kv_splits must be an int in 1..1024, got {num_kv_splits!r}")
    if workspace is not None:
        _tensor("workspace", workspace, (torch.float32,), 1, "float32")
    if not isinstance(allow_fp8_qk, bool):
        raise TypeError(f"allow_fp8_qk must be a bool, got {allow_fp8_qk!r}")
    if check_values:
        _check_values(q_cu_seqlens, seq_lens, block_tables, total_q, q_len, longest, num_pages,
                      page_size, tree_mask, max_kv)

    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("q_cu_seqlens", q_cu_seqlens),
                    ("tree_mask", tree_mask), ("kv_scale", kv_scale_t), ("out", out),
                    ("workspace", workspace)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device}, q is on {dev}: all tensors must be on "
                             f"one device")
    if dev.type != "cuda":
        raise ValueError(f"q must be on a CUDA device, got {dev}")

    rows = max(1, longest) * g
    if num_kv_splits is None:
        q_tile, splits = pick_tiling(rows, bt, hkv, max_kv, total_q * hq, d,
                                     k_cache.element_size(), fp8,
                                     lambda qt: _occupancy(dev, d, qt, k_cache.element_size()))
    else:   # forced splits: the shape's tile
        q_tile, splits = pick_q_tile(rows), num_kv_splits
    row_tiles = -(-rows // q_tile)
    need = workspace_floats(total_q, hq, d, splits)
    if workspace is not None and workspace.numel() < need:
        raise ValueError(f"workspace has {workspace.numel()} float32 elements, {need} needed "
                         f"(workspace_floats)")
    fp8_qk = allow_fp8_qk and fp8_qk_applies(_IN_DTYPES[q.dtype], _KV_DTYPES[k_cache.dtype],
                                             d, q_tile)
    ctas, sms = bt * hkv * row_tiles * splits, sm_count(dev)
    stages = small_grid_stages(_KV_DTYPES[k_cache.dtype], d, q_tile, ctas, splits, sms)
    # (a pool too large for a tensor map's int32 coordinates keeps the cp.async copies)
    kv_tma = (use_tma(_KV_DTYPES[k_cache.dtype], d, q_tile, capability(dev), ctas, splits, sms,
                      page_size) and fits_tensor_map(k_cache.shape))
    static = (float(scale), kv_scale_f, kv_layout, mode, q_tile, page_size, q_len, row_tiles,
              splits, sliding_window or 0, -(-max_kv // KV_TILE), stages, 0, fp8_qk, kv_tma)
    return _Plan(static, need if splits > 1 else 0, workspace is not None)


def spec_dec_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, seq_lens: torch.Tensor,
                       q_cu_seqlens: torch.Tensor | None = None,
                       tree_mask: torch.Tensor | None = None, scale: float | None = None,
                       kv_scale: float | torch.Tensor | None = None, kv_layout: str = "NHD",
                       sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                       max_q_len: int | None = None, max_seq_len: int | None = None,
                       num_kv_splits: int | None = None, workspace: torch.Tensor | None = None,
                       allow_fp8_qk: bool = False, check_values: bool = False) -> torch.Tensor:
    """Attention of the draft tokens of speculative decoding over a paged KV cache.

    Args:
        q: ``[total_q, Hq, D]`` fp16/bf16, sequences back to back (D a multiple of 16 up to
            256: 64, 128 and 256 natively, the others computed in the next of those sizes).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` ("NHD") or
            ``[num_pages, Hkv, page_size, D]`` ("HND"); q's dtype or float8_e4m3fn; contiguous,
            starting 16-byte aligned.
        block_tables: int32 ``[Bt, max_pages_per_seq]``: logical page i of sequence b is
            physical page ``block_tables[b, i]``.
        seq_lens: int32 ``[Bt]``: KV length of each sequence, its draft tokens included.
        q_cu_seqlens: optional int32 ``[Bt + 1]`` ragged draft offsets (default: ``total_q / Bt``
            tokens each).
        tree_mask: optional int32/uint32 ``[total_q, W]``, ``W = ceil(max_q_len / 32)``, packed
            bits LSB first (see ``jitkern.reference.spec_dec_attention.pack_tree_masks``);
            default: causal chain.
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_scale: float or 1-element float32 CUDA tensor, dequantization scale of an fp8 cache.
        kv_layout: "NHD" or "HND".
        sliding_window: chain mode only: query at position P sees positions > P - window.
        out: optional output like ``q``; returned.
        max_q_len: longest draft when ``q_cu_seqlens`` is ragged (default: bound from the mask
            width or ``total_q``); max_seq_len: longest KV length (default: page-table width x
            page size); both only size the launch and must not be exceeded.
        num_kv_splits: force the number of KV splits (default: from batch x KV heads vs SMs).
        workspace: float32 CUDA tensor of at least ``workspace_floats(...)`` elements for the
            split path (default: a cached per-device buffer; graph-capture safe once grown).
        allow_fp8_qk: with an fp8 cache and a bf16 ``q``, allow ``q @ k^T`` on e4m3 tensor cores
            (``q`` split exactly into two e4m3 terms) where it measured faster: 64-row query
            tiles (33-64 query rows per KV head, or larger trees on grids under one wave),
            head_dim 65..256, sm_90a; 1.08-1.24x on such fp8 trees. Hopper's e4m3 MMAs
            accumulate with about 13 bits, so the scores' error grows with their magnitude
            (worst-row output errors ~0.7% at logit std 2, ~2.3% at 8; Frobenius within 1e-2;
            docs/spec_dec_attention.md). Default False: fp16 MMAs everywhere.
        check_values: also check the index tensors' values (reads them back: synchronizes).

    Returns:
        ``out``: ``[total_q, Hq, D]``, q's dtype.
    """
    key = None if check_values else _call_key(
        q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, scale, kv_scale,
        kv_layout, sliding_window, out, max_q_len, max_seq_len, num_kv_splits, workspace,
        allow_fp8_qk)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, scale,
                     kv_scale, kv_layout, sliding_window, out, max_q_len, max_seq_len,
                     num_kv_splits, workspace, allow_fp8_qk, check_values)
        _PLANS.put(key, plan)
    args = plan.bind(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask,
                     kv_scale, out, workspace)
    if q.shape[0]:
        if torch.compiler.is_compiling():
            _spec_dec_attention_op(*args)
        else:   # eager: the same launch without the dispatcher's per-call cost
            _launch(*args)
    return args[8]


# ---- per-signature plans: a repeated call skips validation and planning ------------------------

_PLANS = PlanCache()   # call signature -> _Plan


def _call_key(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, scale,
              kv_scale, kv_layout, sliding_window, out, max_q_len, max_seq_len, num_kv_splits,
              workspace, allow_fp8_qk):
    """Everything ``prepare`` checks or decides from (shapes, contiguity, dtypes, devices, the
    scalar arguments with their types); None when an argument has no metadata to key on (the
    full checks then say what is wrong). Every tensor of the op must be contiguous, so a flag
    stands for its strides; q's device is keyed whole (the checks require CUDA), the others by
    index (they must be on q's device), which is cheaper per call."""
    try:
        ks = (_meta(kv_scale) if isinstance(kv_scale, torch.Tensor)
              else (kv_scale.__class__, kv_scale))
        return (q.shape, q.is_contiguous(), q.dtype, q.device,
                k_cache.shape, k_cache.is_contiguous(), k_cache.dtype, k_cache.get_device(),
                v_cache.shape, v_cache.is_contiguous(), v_cache.dtype, v_cache.get_device(),
                block_tables.shape, block_tables.is_contiguous(), block_tables.dtype,
                block_tables.get_device(),
                seq_lens.shape, seq_lens.is_contiguous(), seq_lens.dtype, seq_lens.get_device(),
                _meta(q_cu_seqlens), _meta(tree_mask), _meta(out), _meta(workspace), ks,
                scale.__class__, scale, kv_layout, sliding_window.__class__, sliding_window,
                max_q_len.__class__, max_q_len, max_seq_len.__class__, max_seq_len,
                num_kv_splits.__class__, num_kv_splits, allow_fp8_qk.__class__, allow_fp8_qk)
    except (AttributeError, TypeError):
        return None


class _Plan:
    """The resolved scalars of a validated call signature (the op's arguments after the
    tensors); ``bind`` puts a call's tensors and the per-device buffers around them."""

    __slots__ = ("static", "ws_floats", "ws_given")

    def __init__(self, static: tuple, ws_floats: int, ws_given: bool):
        self.static = static
        self.ws_floats = ws_floats   # split-KV workspace needed (0: one split)
        self.ws_given = ws_given     # the caller passes its own workspace

    def bind(self, q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, kv_scale,
             out, workspace) -> tuple:
        """The op's argument tuple for this call. The per-device buffers are fetched per call:
        a call with a larger need may have replaced them since this plan was made."""
        dev = q.get_device()   # (an index: the buffers are kept per device index)
        if tree_mask is not None and tree_mask.dtype != torch.int32:
            tree_mask = tree_mask.view(torch.int32)
        if out is None:
            out = torch.empty_like(q)
        if self.ws_given:
            ws = workspace
        elif self.ws_floats:
            ws = reserve_workspace(dev, self.ws_floats)
        else:
            ws = _empty_ws(dev)
        kv_scale_t = kv_scale if isinstance(kv_scale, torch.Tensor) else None
        return (q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens, tree_mask, kv_scale_t,
                out, ws) + self.static


def planned_config(*args, **kwargs) -> dict:
    """The family configuration ``spec_dec_attention(*args, **kwargs)`` would run (validates
    the arguments the same way; used to compile ahead, e.g. in parallel)."""
    a = dict(zip(OP_ARGS, prepare(*args, **kwargs)))
    return dict(kernel_config(a["q"].dtype, a["k_cache"].dtype, a["q"].shape[2], a["kv_layout"],
                              a["mode"], a["page_size"], a["q_tile"], kv_stages=a["kv_stages"],
                              kv_tile=a["kv_tile"], fp8_qk=a["fp8_qk"], kv_tma=a["kv_tma"]))


def _check_values(q_cu, seq_lens, block_tables, total_q, q_len, longest, num_pages, page_size,
                  tree_mask, max_kv):
    lens = seq_lens.cpu().long()
    if q_cu is not None:
        cu = q_cu.cpu().long()
        if int(cu[0]) != 0 or int(cu[-1]) != total_q:
            raise ValueError(f"q_cu_seqlens must start at 0 and end at total_q = {total_q}, got "
                             f"{int(cu[0])} .. {int(cu[-1])}")
        ql = cu[1:] - cu[:-1]
        if bool((ql < 0).any()):
            raise ValueError("q_cu_seqlens must be non-decreasing")
        if int(ql.max()) > longest:
            raise ValueError(f"a draft of {int(ql.max())} tokens exceeds max_q_len {longest}")
    else:
        ql = torch.full_like(lens, q_len)
    if bool((lens < ql).any()):
        b = int((lens < ql).nonzero()[0])
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} is shorter than its {int(ql[b])} draft tokens")
    if int(lens.max()) > max_kv:
        raise ValueError(f"seq_lens max {int(lens.max())} exceeds the page table's capacity / "
                         f"max_seq_len ({max_kv} tokens)")
    bt_host = block_tables.cpu()
    for b in range(lens.shape[0]):
        used = bt_host[b, :(int(lens[b]) + page_size - 1) // page_size]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
            raise ValueError(f"block_tables[{b}] holds a page outside 0..{num_pages - 1}")
