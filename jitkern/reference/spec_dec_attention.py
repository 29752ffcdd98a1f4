"""Float64 reference of speculative-decoding attention over a paged KV cache, and tree-mask tools.

Mask format (XQA's): row ``t`` of a draft of ``n`` tokens is ``W = ceil(n / 32)`` 32-bit words;
draft token ``j`` is visible to row ``t`` iff bit ``j % 32`` of word ``j // 32`` is set (LSB
first). A tree is given by a parent array: ``parents[0] == -1`` (the root, the first draft token),
``0 <= parents[i] < i`` otherwise; a node sees itself and its ancestors.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch


# ---- trees and packed masks --------------------------------------------------------------------

def chain_parents(n: int) -> list[int]:
    """Parent array of a linear draft of ``n`` tokens: [-1, 0, 1, ..., n-2]."""
    return [-1] + list(range(n - 1))


def tree_visibility(parents: Sequence[int]) -> torch.Tensor:
    """bool ``[n, n]``: ``vis[t, j]`` iff node ``j`` is ``t`` or an ancestor of ``t``."""
    n = len(parents)
    vis = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        p = parents[t]
        if t == 0:
            if p != -1:
                raise ValueError(f"parents[0] must be -1 (the root), got {p}")
        elif not 0 <= p < t:
            raise ValueError(f"parents[{t}] = {p}: a parent must come before its child (0 <= p < {t})")
        vis[t, t] = True
        if p >= 0:
            vis[t] |= vis[p]
    return vis


def pack_bits(vis: torch.Tensor, words: int | None = None) -> torch.Tensor:
    """Pack bool ``[rows, n]`` into int32 ``[rows, W]`` holding XQA's uint32 words (LSB first).

    ``words`` (default ``ceil(n / 32)``) pads with zero words. Use ``.view(torch.uint32)`` for
    the unsigned view: the bits are the same."""
    rows, n = vis.shape
    w = words if words is not None else max(1, math.ceil(n / 32))
    if w * 32 < n:
        raise ValueError(f"words={w} holds {w * 32} bits, fewer than the {n} columns")
    bits = torch.zeros(rows, w * 32, dtype=torch.int64)
    bits[:, :n] = vis.to(torch.int64)
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    packed = (bits.view(rows, w, 32) * weights).sum(-1)          # 0 .. 2^32 - 1
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # same bits as int32
    return packed.to(torch.int32)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32/uint32 ``[rows, W]`` -> bool ``[rows, n]``."""
    m = mask.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64, device=m.device)
    bits = (m.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(m.shape[0], -1)[:, :n].bool()


def pack_tree_masks(trees: Sequence[Sequence[int]], words: int | None = None) -> torch.Tensor:
    """Packed masks of a batch of trees (parent arrays, ragged), rows back to back:
    int32 ``[sum(len), W]`` with ``W = ceil(max_len / 32)`` unless ``words`` is given."""
    longest = max(len(t) for t in trees)
    w = words if words is not None else max(1, math.ceil(longest / 32))
    return torch.cat([pack_bits(tree_visibility(t), w) for t in trees], 0)


def random_eagle_tree(n: int, rng: random.Random, max_branch: int = 4) -> list[int]:
    """A random EAGLE-like draft tree of ``n`` nodes: built level by level, each node getting up
    to ``max_branch`` children, the earliest (highest-probability) nodes first."""
    parents = [-1]
    frontier = [0]
    while len(parents) < n:
        nxt = []
        for node in frontier:
            for _ in range(rng.randint(1, max_branch)):
                if len(parents) == n:
                    break
                parents.append(node)
                nxt.append(len(parents) - 1)
        frontier = nxt or [rng.randrange(len(parents))]
    return parents


# ---- the reference ----------------------------------------------------------------------------

def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, b: int, length: int,
              kv_layout: str = "NHD") -> torch.Tensor:
    """Positions ``0..length-1`` of sequence ``b`` from a paged pool, as ``[length, Hkv, D]``
    (same dtype as the pool)."""
    page_size = cache.shape[1] if kv_layout == "NHD" else cache.shape[2]
    npages = (length + page_size - 1) // page_size
    pages = cache[block_tables[b, :npages].long()]
    if kv_layout == "HND":
        pages = pages.transpose(1, 2)
    return pages.reshape(npages * page_size, pages.shape[2], pages.shape[3])[:length]


def visibility(length: int, n: int, t_mask: torch.Tensor | None, sliding_window: int | None,
               device=None) -> torch.Tensor:
    """bool ``[n, length]``: which KV positions each of the ``n`` query rows of one sequence sees.

    ``t_mask``: bool ``[n, n]`` draft visibility (None: causal chain)."""
    ctx = length - n
    pos = torch.arange(length, device=device)
    vis = (pos < ctx).unsqueeze(0).expand(n, length).clone()
    draft = t_mask if t_mask is not None else torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if n:
        lo = max(ctx, 0)
        vis[:, lo:] = draft.to(device)[:, lo - ctx:]
    if sliding_window is not None:
        qpos = ctx + torch.arange(n, device=device)
        vis &= pos.unsqueeze(0) > (qpos.unsqueeze(1) - sliding_window)
    return vis


def spec_dec_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, q_cu_seqlens=None,
                           tree_mask=None, scale=None, kv_scale=None, kv_layout="NHD",
                           sliding_window=None) -> torch.Tensor:
    """Float64 reference of ``jitkern.ops.spec_dec_attention`` (same arguments, see the spec).

    Returns float64 ``[total_q, Hq, D]`` on ``q``'s device. fp8 caches are dequantized as
    ``float(x) * kv_scale``. A row that sees no position gives zeros."""
    total_q, hq, d = q.shape
    bt = seq_lens.shape[0]
    hkv = k_cache.shape[2] if kv_layout == "NHD" else k_cache.shape[1]
    g = hq // hkv
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    ks = 1.0 if kv_scale is None else float(kv_scale)
    if q_cu_seqlens is None:
        cu = [i * (total_q // bt) for i in range(bt + 1)]
    else:
        cu = [int(x) for x in q_cu_seqlens.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
    out = torch.zeros(total_q, hq, d, dtype=torch.float64, device=q.device)
    for b in range(bt):
        n, length = cu[b + 1] - cu[b], lens[b]
        if n == 0:
            continue
        t_mask = None
        if tree_mask is not None:
            t_mask = unpack_bits(tree_mask[cu[b]:cu[b + 1]].cpu(), n)
        vis = visibility(length, n, t_mask, sliding_window, device=q.device)
        k = gather_kv(k_cache, block_tables, b, length, kv_layout).float().double() * ks
        v = gather_kv(v_cache, block_tables, b, length, kv_layout).float().double() * ks
        k = k.repeat_interleave(g, dim=1)                     # [L, Hq, D]: head h reads h // G
        v = v.repeat_interleave(g, dim=1)
        qq = q[cu[b]:cu[b + 1]].to(torch.float64)              # [n, Hq, D]
        s = torch.einsum("thd,lhd->htl", qq, k) * scale
        s = s.masked_fill(~vis.unsqueeze(0), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)           # all-masked rows -> zeros
        out[cu[b]:cu[b + 1]] = torch.einsum("htl,lhd->thd", p, v)
    return out


# ---- random inputs (tests and benchmarks) ------------------------------------------------------

def random_paged_inputs(ctx_lens: Sequence[int], drafts: Sequence[Sequence[int] | int], *,
                        num_heads: int, num_kv_heads: int, head_dim: int,
                        dtype=torch.bfloat16, kv_dtype=None, kv_layout: str = "NHD",
                        page_size: int = 64, tree: bool = True, ragged: bool | None = None,
                        extra_pages: int = 3, extra_table_cols: int = 1, kv_scale=None,
                        device="cuda", generator: torch.Generator | None = None) -> dict:
    """Random arguments of ``spec_dec_attention`` (as a dict of keyword arguments).

    ``ctx_lens[b]``: prefix length of sequence b; ``drafts[b]``: its draft, a parent array (tree)
    or a length (chain). KV length = prefix + draft. Pages are shuffled across a pool with
    ``extra_pages`` spare pages; unused page-table columns hold -1. ``tree=False`` passes no mask
    (causal chain); ``ragged`` (default: lengths differ) passes ``q_cu_seqlens``. fp8 caches hold
    values whose dequantized (``* kv_scale``) magnitude is about 1."""
    kv_dtype = kv_dtype or dtype
    bt = len(ctx_lens)
    trees = [d if not isinstance(d, int) else chain_parents(d) for d in drafts]
    qlens = [len(t) for t in trees]
    lens = [c + n for c, n in zip(ctx_lens, qlens)]
    if ragged is None:
        ragged = len(set(qlens)) > 1
    gen = generator
    npg = [(L + page_size - 1) // page_size for L in lens]
    cols = max(max(npg), 1) + extra_table_cols
    pool = sum(npg) + extra_pages
    perm = torch.randperm(pool, generator=gen).tolist()
    table = torch.full((bt, cols), -1, dtype=torch.int32)
    k = 0
    for b in range(bt):
        for i in range(npg[b]):
            table[b, i] = perm[k]
            k += 1
    shape = ((pool, page_size, num_kv_heads, head_dim) if kv_layout == "NHD"
             else (pool, num_kv_heads, page_size, head_dim))
    total_q = sum(qlens)
    q = torch.randn(total_q, num_heads, head_dim, generator=gen).to(dtype)
    if kv_dtype == torch.float8_e4m3fn:
        ks = 0.5 if kv_scale is None else float(kv_scale)
        kc = (torch.randn(shape, generator=gen) / ks).to(kv_dtype)
        vc = (torch.randn(shape, generator=gen) / ks).to(kv_dtype)
    else:
        ks = None
        kc = torch.randn(shape, generator=gen).to(kv_dtype)
        vc = torch.randn(shape, generator=gen).to(kv_dtype)
    args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=table,
                seq_lens=torch.tensor(lens, dtype=torch.int32), kv_layout=kv_layout)
    if ragged:
        cu = [0]
        for n in qlens:
            cu.append(cu[-1] + n)
        args["q_cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    if tree:
        args["tree_mask"] = pack_tree_masks(trees)
    if ks is not None:
        args["kv_scale"] = ks
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
