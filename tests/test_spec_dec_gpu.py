"""GPU: spec_dec_attention against the float64 reference over a randomized sweep, graph replay,
and a small subset meant to run under compute-sanitizer (``-k sanitizer_subset``)."""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from jitkern.reference.spec_dec_attention import (random_eagle_tree, random_paged_inputs,
                                                  spec_dec_attention_ref)

pytestmark = pytest.mark.gpu

SHAPES = ((32, 8, 128), (8, 1, 128), (64, 8, 128), (8, 4, 256), (16, 16, 64),
          # head dims the kernel pads (to 64, 128 or 256)
          (8, 2, 80), (16, 4, 96), (8, 8, 192), (4, 1, 48), (8, 2, 112))
BOUND = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
N_CASES = 220


def _case(i: int) -> dict:
    """Case i of the sweep: shapes cycle, everything else drawn from a per-case RNG."""
    rng = random.Random(7919 * i + 1)
    hq, hkv, d = SHAPES[i % len(SHAPES)]
    mode = ("decode", "chain", "tree", "tree")[(i // len(SHAPES)) % 4]
    dtype = torch.bfloat16 if rng.random() < 0.7 else torch.float16
    kv = torch.float8_e4m3fn if rng.random() < 0.35 else dtype
    layout = "HND" if rng.random() < 0.4 else "NHD"
    ps = rng.choice((16, 32, 64, 128))
    long = i % 11 == 0                       # about 20 cases reach 8k .. 32k tokens
    batch = 1 if long else rng.choice((1, 2, 3, 4, 6, 8))
    ctx = []
    for _ in range(batch):
        if long:
            ctx.append(rng.randint(8192, 32768))
        else:
            ctx.append(rng.choice((0, 1, rng.randint(1, ps), rng.randint(ps, 4 * ps),
                                   rng.randint(64, 3000))))
    if mode == "decode":
        drafts = [1] * batch
    elif mode == "chain":
        n = rng.randint(2, 8)
        drafts = [n] * batch if rng.random() < 0.5 else [rng.randint(1, 8) for _ in range(batch)]
    else:
        big = rng.random() < 0.4
        drafts = [random_eagle_tree(rng.randint(33, 64) if big else rng.randint(2, 32), rng)
                  for _ in range(batch)]
        if rng.random() < 0.5:   # uniform tree size across the batch
            drafts = [random_eagle_tree(len(drafts[0]), rng) for _ in range(batch)]
    ctx = [max(c, 0 if mode != "decode" else c) for c in ctx]
    extra = {}
    r = rng.random()
    if r < 0.2:
        extra["num_kv_splits"] = rng.randint(2, 9)       # forced splits (empty ones included)
    elif r < 0.3:
        extra["num_kv_splits"] = 1
    if mode == "chain" and rng.random() < 0.2:
        extra["sliding_window"] = rng.randint(1, 300)
    if rng.random() < 0.2:
        extra["scale"] = rng.uniform(0.02, 0.3)
    kv_scale = rng.uniform(0.25, 2.0) if kv == torch.float8_e4m3fn else None
    scale_tensor = kv is torch.float8_e4m3fn and rng.random() < 0.5
    if kv is torch.float8_e4m3fn and rng.random() < 0.5:
        extra["allow_fp8_qk"] = True   # e4m3 Q K^T where it applies (bf16 q, 64+ row tiles)
    return dict(seed=i, shape=(hq, hkv, d), dtype=dtype, kv=kv, layout=layout, ps=ps, ctx=ctx,
                drafts=drafts, tree=mode == "tree", extra=extra, kv_scale=kv_scale,
                scale_tensor=scale_tensor)


def _inputs(c: dict, device="cuda") -> dict:
    hq, hkv, d = c["shape"]
    gen = torch.Generator().manual_seed(c["seed"])
    a = random_paged_inputs(c["ctx"], c["drafts"], num_heads=hq, num_kv_heads=hkv, head_dim=d,
                            dtype=c["dtype"], kv_dtype=c["kv"], kv_layout=c["layout"],
                            page_size=c["ps"], tree=c["tree"], kv_scale=c["kv_scale"],
                            device=device, generator=gen)
    a.update(c["extra"])
    if c["scale_tensor"]:
        a["kv_scale"] = torch.tensor([a["kv_scale"]], dtype=torch.float32, device=device)
    return a


def _ref_args(a: dict) -> dict:
    r = {k: v for k, v in a.items()
         if k not in ("num_kv_splits", "max_q_len", "max_seq_len", "allow_fp8_qk")}
    if isinstance(r.get("kv_scale"), torch.Tensor):
        r["kv_scale"] = float(r["kv_scale"].item())
    return r


def _plan(i: int):
    from jitkern.ops.spec_dec_attention import planned_config

    a = _inputs(_case(i))
    return planned_config(**a)


def _compile(cfg, arch):
    import jitkern
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    jitkern.compile(SPEC_DEC_ATTENTION, cfg, arch=arch)
    return True


@pytest.fixture(scope="module", autouse=True)
def _precompile():
    """Compile every configuration the sweep needs, in parallel processes, into the disk cache
    (the tests then load them from there)."""
    if os.environ.get("JITKERN_TEST_NO_PRECOMPILE"):
        yield
        return
    from jitkern import toolchain
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    cfgs = {tuple(sorted(_plan(i).items())) for i in range(N_CASES)}
    arch = toolchain.resolve_arch(SPEC_DEC_ATTENTION, None,
                                  capability=torch.cuda.get_device_capability())
    workers = min(16, os.cpu_count() or 1)
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile, [dict(c) for c in cfgs], [arch] * len(cfgs)))
    yield


def _check(a: dict, out: torch.Tensor, dtype) -> float:
    ref = spec_dec_attention_ref(**_ref_args(a))
    assert not torch.isnan(out).any(), "NaN in the output (unwritten or poisoned elements)"
    err = (out.double() - ref).norm() / ref.norm().clamp_min(1e-30)
    return float(err)


def _captured(call) -> torch.cuda.CUDAGraph:
    """``call()`` captured into a CUDA graph on a side stream (not replayed yet)."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            call()
    torch.cuda.current_stream().wait_stream(s)
    return g


def _run(a: dict) -> torch.Tensor:
    """One call of the op on a poisoned (NaN-filled) output, synchronized: an element the kernel
    does not write stays NaN, which _check refuses."""
    from jitkern.ops import spec_dec_attention

    out = torch.full_like(a["q"], float("nan"))
    spec_dec_attention(**a, out=out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("i", range(N_CASES))
def test_sweep(i):
    c = _case(i)
    a = _inputs(c)
    out = _run(a)
    err = _check(a, out, c["dtype"])
    assert err < BOUND[c["dtype"]], f"case {c}: relative error {err:.3e}"


def test_dynamic_shared_memory_of_exactly_48_kib_launches():
    """16/16/64 with an fp8 cache in 64-row tiles takes exactly 48 KiB of dynamic shared memory;
    the kernel's static shared memory counts against the default limit too, so the launcher must
    opt in (it used to compare the dynamic bytes alone and the launch failed)."""
    from jitkern.families.spec_dec_attention import shared_bytes

    cfg = dict(head_dim=64, kv_dtype="fp8_e4m3", q_tile=64)
    assert shared_bytes(cfg) == 48 * 1024
    g = torch.Generator().manual_seed(11)
    a = random_paged_inputs([70, 300], [random_eagle_tree(32, random.Random(1)),
                                        random_eagle_tree(40, random.Random(2))],
                            num_heads=16, num_kv_heads=16, head_dim=64,
                            kv_dtype=torch.float8_e4m3fn, kv_scale=0.8, generator=g)
    out = _run(a)
    assert _check(a, out, torch.bfloat16) < BOUND[torch.bfloat16]


def test_empty_prefix_row_without_bits_is_zero():
    """L - n == 0 and a mask row with no bit set: that row is zeros, never NaN."""
    a = random_paged_inputs([0], [[-1, 0, 0, 1]], num_heads=8, num_kv_heads=2, head_dim=128,
                            page_size=16, generator=torch.Generator().manual_seed(3))
    a["tree_mask"][2] = 0
    out = _run(a)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    err = _check(a, out, torch.bfloat16)
    assert err < 1e-2


@pytest.mark.parametrize("mode,kv", [("decode", torch.bfloat16), ("chain", torch.float8_e4m3fn),
                                     ("tree", torch.bfloat16), ("tree", torch.float8_e4m3fn)])
@pytest.mark.parametrize("scale", [-0.09, 0.0])
@pytest.mark.parametrize("splits", [None, 3])
def test_negative_and_zero_softmax_scales(mode, kv, scale, splits):
    """The softmax scale is any finite float: a negative one makes the smallest dot product each
    row's max (the running max and the skip of the quad reduction must see scaled scores), zero
    makes every visible position equally likely (masked ones must stay out)."""
    g = torch.Generator().manual_seed(29)
    drafts = {"decode": [1, 1], "chain": [4, 3],
              "tree": [random_eagle_tree(16, random.Random(5)), random_eagle_tree(9, random.Random(6))]
              }[mode]
    # G = 4: decode and chains run 16-row tiles, the trees 64-row (warpgroup) tiles
    hq, hkv = (8, 2) if mode != "tree" else (16, 4)
    a = random_paged_inputs([2500, 700], drafts, num_heads=hq, num_kv_heads=hkv, head_dim=128,
                            page_size=64, kv_dtype=kv, tree=mode == "tree", generator=g,
                            kv_scale=0.6 if kv == torch.float8_e4m3fn else None)
    a["scale"] = scale
    if splits:
        a["num_kv_splits"] = splits
    out = _run(a)
    assert _check(a, out, torch.bfloat16) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("mode,kv", [("decode", torch.bfloat16), ("tree", torch.bfloat16),
                                     ("chain", torch.float8_e4m3fn), ("tree", torch.float8_e4m3fn)])
@pytest.mark.parametrize("splits", [None, 3])
def test_rising_scores_and_late_jumps(mode, kv, splits):
    """Scores that rise along the context (a row's max grows on most KV tiles) with two jumps far
    past it near the end: the lazily moved reference max (probabilities up to 2^8 between moves,
    then a rescale) must stay within the bound, split or not."""
    g = torch.Generator().manual_seed(17)
    drafts = {"decode": [1, 1], "chain": [4, 4],
              "tree": [random_eagle_tree(12, random.Random(3))] * 2}[mode]
    hq, hkv, d, ps = 8, 2, 128, 64
    a = random_paged_inputs([3000, 1700], drafts, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                            page_size=ps, kv_dtype=kv, tree=mode == "tree", generator=g,
                            kv_scale=1.0 if kv == torch.float8_e4m3fn else None, device="cpu")
    v = torch.randn(hkv, d, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    q = v.repeat_interleave(hq // hkv, dim=0)[None] * 4
    q = q + torch.randn(a["q"].shape, generator=g) * 0.05
    a["q"] = q.to(a["q"].dtype)
    k = a["k_cache"].float()
    for b, L in enumerate(a["seq_lens"].tolist()):
        pos = torch.arange(L)
        ramp = 150.0 * pos / L                       # natural-log scores rise to ~53
        ramp[L - 300:L - 290] += 40                  # jumps of ~14 (20 in log2 units)
        ramp[L - 40:L - 35] += 60
        pg, off = a["block_tables"][b, pos // ps].long(), pos % ps
        k[pg, off] = v[None] * ramp[:, None, None] + torch.randn(L, hkv, d, generator=g) * 0.05
    a["k_cache"] = k.to(kv)
    a = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in a.items()}
    if splits:
        a["num_kv_splits"] = splits
    out = _run(a)
    assert _check(a, out, torch.bfloat16) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("shape", [(32, 8, 128), (8, 4, 256), (8, 2, 80)])
@pytest.mark.parametrize("nodes", [16, 64])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("fp8_qk", [False, True])
def test_fp8_cache_query_rows_of_far_apart_scales(shape, nodes, splits, fp8_qk):
    """fp8 cache, bf16 query, trees (64- and 128-row tiles). Query rows whose magnitudes differ
    by up to 2^14 within one CTA, a large kv_scale (so the small rows carry the scores: e4m3
    alone would flush them to zero) and rows whose logits have a std of 32 (peaked softmax).
    The fp16 path keeps every row within 1e-2. With allow_fp8_qk (the query split into exact
    hi + lo e4m3 terms under a per-row power-of-two scale, e4m3 MMAs) the Frobenius error stays
    within the bf16 bound and each row within 0.15: the score error of Hopper's e4m3
    accumulation grows with the logits (measured 6-9% on the worst rows here); a wrong split
    or scale would be off by O(1)."""
    hq, hkv, d = shape
    g = torch.Generator().manual_seed(nodes + d)
    rng = random.Random(nodes * 7 + d)
    drafts = [random_eagle_tree(nodes, rng) for _ in range(2)]
    ks = 2.0 ** 10
    a = random_paged_inputs([700, 2100], drafts, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                            kv_dtype=torch.float8_e4m3fn, generator=g, device="cpu")
    a["kv_scale"] = ks   # stored values stay about 2 (well inside e4m3); dequantized ~2^11
    q = torch.randn(a["q"].shape, generator=g, dtype=torch.float64)
    # per (token, head) row: 2^u / kv_scale, u in [-10, 4]: scores from ~0 to ~|q.k| * 16
    u = torch.randint(-10, 5, q.shape[:2], generator=g).double()
    q = q * (2.0 ** u)[..., None] / ks
    a["q"] = q.to(torch.bfloat16)
    a = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in a.items()}
    if splits:
        a["num_kv_splits"] = splits
    a["allow_fp8_qk"] = fp8_qk
    out = _run(a)
    ref = spec_dec_attention_ref(**_ref_args(a))
    assert not torch.isnan(out).any()
    # row by row: a small-magnitude row's error must not hide behind the large rows' norm
    err = (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    row_bound = 0.15 if fp8_qk else 1e-2
    assert float(err.max()) < row_bound, f"worst row relative error {float(err.max()):.3e}"
    assert _check(a, out, torch.bfloat16) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("kind", ["decode", "tree"])
def test_repeated_signature_reuses_its_plan_and_stays_exact(kind):
    """A second call with the same signature skips validation and planning (one plan), still
    matches the reference on new values, and any change of signature is checked again."""
    import importlib

    from jitkern.ops import spec_dec_attention

    mod = importlib.import_module("jitkern.ops.spec_dec_attention")
    a = _replay_inputs(kind, 11)
    out = torch.full_like(a["q"], float("nan"))
    spec_dec_attention(**a, out=out)
    n = len(mod._PLANS)
    for seed in (12, 13):   # same shapes, new values: the cached plan, exact results
        b = _replay_inputs(kind, seed)
        out = torch.full_like(b["q"], float("nan"))
        spec_dec_attention(**b, out=out)
        assert len(mod._PLANS) == n
        assert _check(b, out, torch.bfloat16) < 1e-2
    # a new scale is a new signature, not a stale plan
    spec_dec_attention(**dict(b, scale=0.05), out=out)
    assert len(mod._PLANS) == n + 1
    assert _check(dict(b, scale=0.05), out, torch.bfloat16) < 1e-2
    # signatures that must fail still fail after the valid one was cached
    with pytest.raises(TypeError, match="q must have dtype float16 or bfloat16"):
        spec_dec_attention(**dict(b, q=b["q"].float()))
    bad_q = b["q"].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="q must be contiguous"):
        spec_dec_attention(**dict(b, q=bad_q))
    with pytest.raises(ValueError, match="is on cpu"):
        spec_dec_attention(**dict(b, seq_lens=b["seq_lens"].cpu()))


def _replay_inputs(kind, seed):
    """Split-path inputs: 16-node trees (64-row tiles) or decode (16-row tiles)."""
    rng = random.Random(5)
    kv = torch.float8_e4m3fn if kind == "tree_fp8" else torch.bfloat16
    drafts = [1, 1] if kind == "decode" else [random_eagle_tree(16, rng) for _ in range(2)]
    return random_paged_inputs([3000, 5000], drafts, num_heads=32, num_kv_heads=8, head_dim=128,
                               kv_dtype=kv, page_size=64, tree=kind != "decode",
                               generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["tree", "tree_fp8", "decode"])
def test_graph_replay_identical(kind):
    """A captured call (split-KV path, workspace grown before capture) replays bit-identically
    to the eager call on new inputs copied into the same buffers."""
    from jitkern.ops import spec_dec_attention

    a = _replay_inputs(kind, 1)
    if kind == "tree_fp8":
        a["kv_scale"] = torch.tensor([0.5], device="cuda")
    out = torch.empty_like(a["q"])
    spec_dec_attention(**a, out=out, num_kv_splits=6)    # warm: compile, load, grow workspace
    torch.cuda.synchronize()
    g = _captured(lambda: spec_dec_attention(**a, out=out, num_kv_splits=6))
    for seed in (11, 12):
        b = _replay_inputs(kind, seed)
        for k in ("q", "k_cache", "v_cache"):
            a[k].copy_(b[k])
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        eager = spec_dec_attention(**a, num_kv_splits=6)
        assert torch.equal(out, eager)
        assert _check(a, out, torch.bfloat16) < 1e-2


@pytest.mark.parametrize("shape,nodes,kv,batch,splits", [
    ((32, 8, 128), 64, torch.bfloat16, 3, 12),
    ((16, 16, 64), 64, torch.bfloat16, 3, 12),
    ((32, 8, 128), 16, torch.float8_e4m3fn, 3, 12),
    ((8, 4, 256), 64, torch.bfloat16, 3, 40),      # 8 splits a round: five rounds
    ((8, 2, 80), 33, torch.float16, 2, 8),         # padded head dim
    ((32, 8, 128), 64, torch.bfloat16, 12, 12),    # a merge grid of several waves
    ((8, 1, 128), 0, torch.bfloat16, 5, 9),        # ragged trees of 1..64 nodes (q_cu_seqlens)
    ((32, 8, 128), 0, torch.float8_e4m3fn, 4, 16),
])
def test_merge_kernel_as_programmatic_launch(shape, nodes, kv, batch, splits, monkeypatch):
    """Split trees of 64- and 128-row tiles merge in a second kernel launched as a programmatic
    dependent (its CTAs start while the attention grid finishes, and wait in the kernel): the
    output equals an ordinary launch's, bit for bit, and the reference's within the bound, eager
    and graph-replayed (nodes 0: ragged trees)."""
    import importlib

    from jitkern.ops import spec_dec_attention

    sda = importlib.import_module("jitkern.ops.spec_dec_attention")
    hq, hkv, d = shape
    rng = random.Random(nodes)
    ctx = [5000, 1200, 7000, 300, 2500, 64, 4000, 900, 3100, 20, 6000, 1500][:batch]
    dtype = torch.float16 if kv == torch.float16 else torch.bfloat16
    sizes = [nodes] * batch if nodes else [64, 1, 37, 16, 50][:batch]
    a = random_paged_inputs(ctx, [random_eagle_tree(m, rng) for m in sizes],
                            num_heads=hq, num_kv_heads=hkv, head_dim=d, kv_dtype=kv, dtype=dtype,
                            page_size=64, tree=True,
                            kv_scale=0.6 if kv == torch.float8_e4m3fn else None,
                            generator=torch.Generator().manual_seed(nodes + d))
    a["num_kv_splits"] = splits
    assert sda.planned_config(**a)["q_tile"] >= 64   # the merge kernel's tiles
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(sda, "MERGE_PDL", pdl)
        sda._LAUNCH.clear()
        outs[pdl] = _run(a)
    sda._LAUNCH.clear()
    assert torch.equal(outs[True], outs[False])
    assert _check(a, outs[True], dtype) < BOUND[dtype]
    out = torch.full_like(a["q"], float("nan"))
    g = _captured(lambda: spec_dec_attention(**a, out=out))
    for _ in range(2):
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, outs[True])


@pytest.mark.parametrize("drafts", [[1, 1, 1], [3, 2, 4]])
def test_repeated_split_calls_stay_exact(drafts, monkeypatch):
    """16-row tiles (decode, short chains) merge their splits in the merge kernel too: an
    ordinary and a programmatic launch of it give the same bits, and back-to-back calls through
    the shared workspace (different split counts too) all stay exact."""
    import importlib

    from jitkern.ops import spec_dec_attention

    sda = importlib.import_module("jitkern.ops.spec_dec_attention")
    a = random_paged_inputs([2000, 700, 4100], drafts, num_heads=32, num_kv_heads=8,
                            head_dim=128, tree=False, generator=torch.Generator().manual_seed(4))
    if "q_cu_seqlens" in a:
        a["max_q_len"] = max(drafts)            # 16 rows per KV head
    assert sda.planned_config(**a, num_kv_splits=7)["q_tile"] == 16
    monkeypatch.setattr(sda, "MERGE_PDL", False)
    sda._LAUNCH.clear()
    plain = spec_dec_attention(**a, num_kv_splits=7)
    monkeypatch.undo()
    sda._LAUNCH.clear()
    first = spec_dec_attention(**a, num_kv_splits=7)
    assert torch.equal(first, plain)
    assert _check(a, first, torch.bfloat16) < 1e-2
    for splits in (7, 3, 7, 16):
        out = torch.full_like(a["q"], float("nan"))
        spec_dec_attention(**a, out=out, num_kv_splits=splits)
        if splits == 7:
            assert torch.equal(out, first)
        assert _check(a, out, torch.bfloat16) < 1e-2


@pytest.mark.parametrize("shape,kv,drafts,splits", [
    ((32, 8, 128), "bf16", [1], 64),            # decode, 4 rows: eight merge rounds
    ((32, 8, 128), "bf16", [4, 4], 40),          # 16 rows: five rounds
    ((32, 8, 128), "fp8", [3, 4], 29),           # fp8 partials carry the V scale; ragged
    ((16, 16, 64), "fp16", [1, 1, 1], 100),      # more splits than tiles: empty partials
    ((8, 4, 256), "bf16", [8], 23),              # 512-byte rows, a partial last round
    ((8, 1, 128), "bf16", [2, 1], 17),           # G = 8, chain of 2: 16 rows
])
def test_small_tile_merge_many_splits(shape, kv, drafts, splits):
    """16-row tiles split many ways: the merge kernel's rounds of MERGE_KERNEL_U splits, a last
    partial round, empty splits (more splits than tiles), fp8 partials carrying the V scale,
    every head dim."""
    from jitkern.ops import spec_dec_attention
    from jitkern.ops.spec_dec_attention import pick_q_tile

    hq, hkv, d = shape
    dtype = torch.float16 if kv == "fp16" else torch.bfloat16
    kv_dtype = torch.float8_e4m3fn if kv == "fp8" else dtype
    assert pick_q_tile(max(drafts) * (hq // hkv)) == 16
    gen = torch.Generator().manual_seed(splits)
    ctx = [3000 + 517 * i for i in range(len(drafts))]
    a = random_paged_inputs(ctx, drafts, num_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                            kv_dtype=kv_dtype, tree=False, page_size=32,
                            kv_scale=0.7 if kv == "fp8" else None, generator=gen)
    if "q_cu_seqlens" in a:
        a["max_q_len"] = max(drafts)
    out = torch.full_like(a["q"], float("nan"))
    spec_dec_attention(**a, out=out, num_kv_splits=splits)
    torch.cuda.synchronize()
    assert _check(a, out, dtype) < BOUND[dtype]


@pytest.mark.parametrize("shape,nodes,kv,ctx,batch,layout,tile", [
    ((32, 8, 128), 16, "bf16", 1000, 1, "NHD", 16),    # 64 rows per KV head in 16-row tiles
    ((32, 8, 128), 16, "fp8", 700, 2, "HND", 16),
    ((32, 8, 128), 16, "fp8", 4000, 1, "NHD", 32),     # fp8: 32-row tiles a little further
    ((32, 8, 128), 64, "bf16", 2000, 1, "HND", 64),    # 256 rows: the 128-row tile's half
    ((8, 1, 128), 16, "bf16", 8000, 1, "NHD", 16),     # one KV head: 8 row tiles, 16 splits
    ((8, 1, 128), 4, "fp8", 8000, 1, "HND", 16),       # a 4-chain of 32 rows in two tiles
    ((8, 4, 256), 16, "bf16", 1000, 1, "NHD", 16),
    ((16, 16, 64), 64, "fp16", 1000, 1, "NHD", 16),
])
def test_small_grids_run_small_query_tiles(shape, nodes, kv, ctx, batch, layout, tile):
    """Grids with little work per SM take query tiles smaller than the shape's (pick_tiling):
    many row tiles per KV head, each masking its own draft rows, split and merged; ragged
    contexts, poisoned outputs, and a graph replay that reproduces the eager call."""
    from jitkern.ops import spec_dec_attention
    from jitkern.ops.spec_dec_attention import planned_config

    hq, hkv, d = shape
    dtype = torch.float16 if kv == "fp16" else torch.bfloat16
    kv_dtype = torch.float8_e4m3fn if kv == "fp8" else dtype
    rng = random.Random(nodes * ctx + batch)
    tree = nodes > 4
    drafts = ([random_eagle_tree(nodes, rng) for _ in range(batch)] if tree
              else [nodes] * batch)
    gen = torch.Generator().manual_seed(ctx + nodes)
    a = random_paged_inputs([ctx - 37 * i for i in range(batch)], drafts, num_heads=hq,
                            num_kv_heads=hkv, head_dim=d, dtype=dtype, kv_dtype=kv_dtype,
                            kv_layout=layout, page_size=64, tree=tree,
                            kv_scale=0.8 if kv == "fp8" else None, generator=gen)
    if torch.cuda.get_device_properties(0).multi_processor_count == 132:   # H100 / H200
        assert planned_config(**a)["q_tile"] == tile
    out = _run(a)
    assert _check(a, out, dtype) < BOUND[dtype]
    replay = torch.full_like(out, float("nan"))
    g = _captured(lambda: spec_dec_attention(**a, out=replay))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(replay, out)


def test_kv_bound_from_max_seq_len():
    """Split ranges come from the host's KV bound (max_seq_len when given): a tight bound and a
    loose page table give the same result as the reference; sequences far shorter than the bound
    leave their last splits empty."""
    from jitkern.ops import spec_dec_attention

    a = random_paged_inputs([9000, 40, 2100], [1, 1, 1], num_heads=32, num_kv_heads=8,
                            head_dim=128, tree=False, extra_table_cols=20,
                            generator=torch.Generator().manual_seed(9))
    for bound in (9001, None):
        out = torch.full_like(a["q"], float("nan"))
        spec_dec_attention(**a, out=out, max_seq_len=bound, num_kv_splits=24)
        torch.cuda.synchronize()
        assert _check(a, out, torch.bfloat16) < 1e-2


@pytest.mark.parametrize("tile", [0, 128])   # 0: the source's choice, 64 (an explicit 64 is the same kernel)
@pytest.mark.parametrize("stages", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("kind", ["decode", "chain_fp8", "tree"])
def test_pipeline_depths(stages, kind, tile):
    """Every K/V pipeline depth and KV tile the family offers (kv_stages, kv_tile; measured by
    the benchmark's explore mode and the cache-hint probe) matches the reference, split and
    unsplit, where its shared memory fits."""
    from jitkern.families.spec_dec_attention import MAX_SHARED, shared_bytes, tma_shape
    from jitkern.ops.spec_dec_attention import OP_ARGS, _spec_dec_attention_op, prepare

    rng = random.Random(stages)
    kv = torch.float8_e4m3fn if kind == "chain_fp8" else torch.bfloat16
    drafts = {"decode": [1, 1], "chain_fp8": [4, 3],
              "tree": [random_eagle_tree(16, rng) for _ in range(2)]}[kind]
    a = random_paged_inputs([2500, 700], drafts, num_heads=32, num_kv_heads=8, head_dim=128,
                            kv_dtype=kv, page_size=16, tree=kind == "tree",
                            kv_scale=0.6 if kind == "chain_fp8" else None,
                            generator=torch.Generator().manual_seed(stages))
    if "q_cu_seqlens" in a:
        a["max_q_len"] = max(len(d) if isinstance(d, list) else d for d in drafts)
    for splits in (1, 5):
        out = torch.full_like(a["q"], float("nan"))
        args = list(prepare(**a, out=out, num_kv_splits=splits))
        q_tile = args[OP_ARGS["q_tile"]]
        cfg = dict(head_dim=128, q_tile=q_tile, kv_dtype="fp8_e4m3" if kind == "chain_fp8"
                   else "bf16", kv_stages=stages, kv_tile=tile)
        if shared_bytes(cfg) > MAX_SHARED:
            pytest.skip(f"kv_stages {stages} with kv_tile {tile} does not fit q_tile {q_tile}")
        args[OP_ARGS["kv_stages"]], args[OP_ARGS["kv_tile"]] = stages, tile
        # (tensor maps where the op chose them and the tile keeps them: 64-position KV tiles
        # in the warpgroup tiles)
        args[OP_ARGS["kv_tma"]] = args[OP_ARGS["kv_tma"]] and tma_shape(dict(cfg, kv_tile=tile))
        _spec_dec_attention_op(*args)
        torch.cuda.synchronize()
        assert _check(a, out, torch.bfloat16) < 1e-2


def test_capture_refuses_to_grow_workspace():
    from jitkern.ops import spec_dec_attention
    from jitkern.ops.spec_dec_attention import _KEEP, _WORKSPACE

    a = random_paged_inputs([4000], [4], num_heads=64, num_kv_heads=8, head_dim=128, tree=False,
                            generator=torch.Generator().manual_seed(2))
    idx = torch.cuda.current_device()
    if idx in _WORKSPACE:
        _KEEP.append(_WORKSPACE.pop(idx))          # start from no cached workspace
    splits = 4
    spec_dec_attention(**a, num_kv_splits=1)       # compile and load outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot grow during CUDA graph capture"):
        with torch.cuda.graph(g):
            spec_dec_attention(**a, num_kv_splits=splits)


def test_capture_of_a_first_unsplit_call_is_refused():
    """An unsplit call passes a per-device placeholder as its workspace, made by the first such
    call on the device: a capture before any eager unsplit call there is refused, saying what to
    do, instead of allocating inside the graph."""
    from jitkern.ops import spec_dec_attention
    from jitkern.ops.spec_dec_attention import _NO_WS

    a = random_paged_inputs([300, 90], [1, 1], num_heads=8, num_kv_heads=2, head_dim=128,
                            tree=False, generator=torch.Generator().manual_seed(6))
    out = torch.empty_like(a["q"])
    spec_dec_attention(**a, out=out, num_kv_splits=1)   # compile, load and plan outside
    torch.cuda.synchronize()
    idx = torch.cuda.current_device()
    saved = _NO_WS.pop(idx)
    try:
        g = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="spec_dec_attention: call once before CUDA graph "
                                               "capture"):
            with torch.cuda.graph(g):
                spec_dec_attention(**a, out=out, num_kv_splits=1)
    finally:
        _NO_WS[idx] = saved


def test_too_small_workspace_is_refused_before_launch():
    from jitkern.ops import spec_dec_attention
    from jitkern.ops.spec_dec_attention import workspace_floats

    a = random_paged_inputs([4000], [4], num_heads=64, num_kv_heads=8, head_dim=128, tree=False,
                            generator=torch.Generator().manual_seed(2))
    need = workspace_floats(4, 64, 128, 4)
    small = torch.empty(need - 1, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match=f"workspace has {need - 1} float32 elements, {need} "
                                         f"needed \\(workspace_floats\\)"):
        spec_dec_attention(**a, num_kv_splits=4, workspace=small)


SANITIZER_CASES = (0, 2, 7, 13, 23, 24, 31, 48, 60, 61, 73, 74)   # 23 31 60 61 73 74: wgmma


@pytest.mark.parametrize("i", SANITIZER_CASES)
def test_sanitizer_subset(i):
    """Short cases (contexts capped) covering modes, fp8, both layouts and the split path;
    run under compute-sanitizer memcheck."""
    c = _case(i)
    c["ctx"] = [min(x, 700) for x in c["ctx"]][:3]
    c["drafts"] = c["drafts"][:3]
    c["extra"]["num_kv_splits"] = 3
    a = _inputs(c)
    out = _run(a)
    assert _check(a, out, c["dtype"]) < BOUND[c["dtype"]]


@pytest.mark.parametrize("shape,mode,kv", [
    (shape, mode, torch.bfloat16) for shape in ((16, 16, 64), (32, 8, 128), (8, 4, 256))
    for mode in ("decode", "chain", "tree16", "tree64")] + [
    ((32, 8, 128), "tree16", torch.float8_e4m3fn), ((16, 4, 256), "tree16", torch.float8_e4m3fn),
    ((8, 8, 128), "tree64", torch.float8_e4m3fn)] + [
    (shape, mode, torch.float8_e4m3fn) for shape, mode in (
        ((32, 8, 128), "decode"), ((32, 8, 128), "chain"), ((8, 4, 256), "decode"),
        ((8, 1, 128), "chain"), ((16, 16, 128), "tree16"))],
    ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("ps", [16, 32, 64, 128])
def test_tma_loads_equal_cp_async_over_poisoned_tails(shape, mode, kv, layout, ps, monkeypatch):
    """16-bit caches load K/V with tensor maps (kv_tma) on sm_90+, in every query tile (decode
    and chains: 16 and 32 rows; 16-node trees: 16, 32 and 64; 64-node trees: 64 and 128, the
    warpgroup tiles, whose 64-row form copies a half tile per warpgroup), and fp8 caches in
    16-, 32- and 64-row tiles (the small ones read their fragments from the swizzled rows, the
    64-row ones convert to fp16 after landing): the output equals
    the cp.async kernel's bit for bit and the reference's within the bound, eager and
    graph-replayed, although the pool holds NaN at every position past each sequence's end in
    its last pages (TMA copies whole pages; V's tail rows must be zeroed) and the page table
    holds out-of-range page ids past the used pages (the unit bounds-checks them). (fp8 16- and
    32-row tiles at page 16 take no tensor maps: those cases check the plan and skip.)"""
    import importlib

    from jitkern.families.spec_dec_attention import tma_grids
    from jitkern.ops import spec_dec_attention

    sda = importlib.import_module("jitkern.ops.spec_dec_attention")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor maps need sm_90")
    hq, hkv, d = shape
    rng = random.Random(ps + d)
    ctx = [rng.randint(1, 3000) for _ in range(3)] + [ps - 1, 64 * 5]
    if mode.startswith("tree"):
        drafts = [random_eagle_tree(int(mode[4:]), rng) for _ in ctx]
    else:
        drafts = [1 if mode == "decode" else 3] * len(ctx)
    fp8 = kv == torch.float8_e4m3fn
    a = random_paged_inputs(ctx, drafts, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                            dtype=torch.bfloat16, kv_dtype=kv, kv_scale=0.7 if fp8 else None,
                            kv_layout=layout, page_size=ps, tree=mode.startswith("tree"),
                            extra_table_cols=3, generator=torch.Generator().manual_seed(ps * d))
    if mode == "tree64":   # forced splits run the shape's own tile (128 rows where G > 1)
        a["num_kv_splits"] = 2
    # (tiles that take tensor maps on large or crowded grids only: on every grid here; each
    # case's own tile, not the smaller one a grid of little work per SM may take)
    monkeypatch.setattr(sda, "tma_on_grid", lambda grids, *_: grids != "none")
    monkeypatch.setattr(sda, "SMALL_GRID_TILES", False)
    monkeypatch.setattr(sda, "_PLANS", type(sda._PLANS)())   # plans of this test only
    lens, table = a["seq_lens"].tolist(), a["block_tables"]
    for b, L in enumerate(lens):
        used = -(-L // ps)
        last = int(table[b, used - 1])
        for c in (a["k_cache"], a["v_cache"]):   # the last page's rows past the end
            if layout == "NHD":
                c[last, L - (used - 1) * ps:] = float("nan")
            else:
                c[last, :, L - (used - 1) * ps:] = float("nan")
        bad = [2**30, -7, 2**31 - 1]
        table[b, used:] = torch.tensor([bad[i % 3] for i in range(table.shape[1] - used)],
                                       dtype=table.dtype)
    plan = sda.planned_config(**a)
    assert plan["q_tile"] == {"decode": 16, "chain": 16 if 4 * hq // hkv <= 16 else 32,
                              "tree16": 16 * hq // hkv, "tree64": min(64 * hq // hkv, 128)}[mode]
    if tma_grids(dict(kv_dtype="fp8_e4m3" if fp8 else "bf16", head_dim=d, q_tile=plan["q_tile"],
                      page_size=ps)) == "none":   # fp8 16/32-row tiles at page 16
        assert not plan.get("kv_tma")
        pytest.skip("the op takes no tensor maps for this tile at this page size (tma_grids)")
    assert plan.get("kv_tma")
    outs = {}
    for tma in (False, True):
        monkeypatch.setattr(sda, "KV_TMA", tma)
        sda._PLANS.clear()
        sda._LAUNCH.clear()
        outs[tma] = _run(a)
    assert torch.equal(outs[True], outs[False])
    assert _check(a, outs[True], torch.bfloat16) < BOUND[torch.bfloat16]
    out = torch.full_like(a["q"], float("nan"))
    g = _captured(lambda: spec_dec_attention(**a, out=out))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, outs[True])


def _repack_pages(a: dict, page_size: int, gen: torch.Generator) -> dict:
    """``a`` with its caches moved to pages of ``page_size`` positions: the same logical K/V per
    sequence, new pages in a shuffled pool whose unused rows hold NaN, a new page table."""
    kc, vc, table = a["k_cache"], a["v_cache"], a["block_tables"]
    nhd = a.get("kv_layout", "NHD") == "NHD"
    ps = kc.shape[1] if nhd else kc.shape[2]
    hkv, d = (kc.shape[2], kc.shape[3]) if nhd else (kc.shape[1], kc.shape[3])
    lens = a["seq_lens"].tolist()
    npg = [-(-L // page_size) for L in lens]
    pool = sum(npg) + 2
    perm = torch.randperm(pool, generator=gen).tolist()
    new_table = torch.full((len(lens), max(npg) + 1), -1, dtype=torch.int32)
    shape = (pool, page_size, hkv, d) if nhd else (pool, hkv, page_size, d)
    # (fp8 caches move as bytes: indexing is not defined for float8 tensors; 0x7F is e4m3 NaN)
    raw = {n: c.view(torch.uint8) if c.element_size() == 1 else c
           for n, c in (("k_cache", kc), ("v_cache", vc))}
    out = {n: torch.full(shape, 0x7F if c.dtype == torch.uint8 else float("nan"), dtype=c.dtype,
                         device=c.device) for n, c in raw.items()}
    k = 0
    for b, L in enumerate(lens):
        old = table[b, :-(-L // ps)].long().to(kc.device)
        for name, c in raw.items():
            seq = c[old] if nhd else c[old].transpose(1, 2)      # [pages, ps, hkv, d]
            seq = seq.reshape(-1, hkv, d)[:L]
            for i in range(npg[b]):
                rows = seq[i * page_size:(i + 1) * page_size]
                if nhd:
                    out[name][perm[k + i], :rows.shape[0]] = rows
                else:
                    out[name][perm[k + i], :, :rows.shape[0]] = rows.transpose(0, 1)
        new_table[b, :npg[b]] = torch.tensor(perm[k:k + npg[b]], dtype=torch.int32)
        k += npg[b]
    out = {n: o.view(kc.dtype) for n, o in out.items()}
    return dict(a, **out, block_tables=new_table.to(table.device))


@pytest.mark.parametrize("shape,mode,kv,batch,splits", [
    ((32, 8, 128), "decode", torch.bfloat16, 3, None),    # 16-row tiles, small grid
    ((32, 8, 128), "decode", torch.bfloat16, 40, None),   # large grid: tensor maps at page 16
    ((32, 8, 128), "chain", torch.float8_e4m3fn, 3, None),   # fp8 warp pipelines
    ((16, 16, 64), "decode", torch.bfloat16, 3, None),    # head_dim 64: the CTA's pipeline
    ((32, 8, 128), "tree16", torch.bfloat16, 4, 2),       # 64-row warpgroup tiles
    ((32, 8, 128), "tree64", torch.bfloat16, 2, 2),       # 128-row tiles, tensor maps
    ((32, 8, 128), "tree64", torch.float8_e4m3fn, 2, 2),  # fp8 128-row tiles, cp.async
    ((8, 4, 256), "tree16", torch.bfloat16, 3, None)],
    ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_pages_of_16_and_32_equal_pages_of_64(shape, mode, kv, batch, splits, layout):
    """The same logical K/V in pages of 16, 32 and 64 positions (shuffled pools, NaN in every
    row no page maps) gives bit-identical outputs: the page-table slots, the ids read at issue
    (128-row tiles), and the copy forms each page size takes (tensor maps or cp.async) change
    where bytes come from, never the arithmetic. The page-64 output is also checked against the
    float64 reference."""
    from jitkern.ops.spec_dec_attention import planned_config

    hq, hkv, d = shape
    rng = random.Random(hq * d + batch)
    ctx = [rng.randint(200, 3000) for _ in range(batch)] if batch < 10 else \
        [rng.randint(100, 400) for _ in range(batch)]
    if mode.startswith("tree"):
        drafts = [random_eagle_tree(int(mode[4:]), rng) for _ in ctx]
    else:
        drafts = [1 if mode == "decode" else 4] * len(ctx)
    fp8 = kv == torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(hq + d + batch)
    a = random_paged_inputs(ctx, drafts, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                            dtype=torch.bfloat16, kv_dtype=kv, kv_scale=0.6 if fp8 else None,
                            kv_layout=layout, page_size=64, tree=mode.startswith("tree"),
                            generator=gen)
    # the same KV bound at every page size (it sets the split ranges), and the same splits
    a["max_seq_len"] = int(a["seq_lens"].max())
    if splits:
        a["num_kv_splits"] = splits
    want = _run(a)
    assert _check(a, want, torch.bfloat16) < BOUND[torch.bfloat16]
    for ps in (16, 32):
        b = _repack_pages(a, ps, gen)
        plan = planned_config(**b)
        if mode == "tree64":   # (forced splits run the shape's own tile)
            assert plan["q_tile"] == 128
        if mode == "decode" and ps == 16 and hkv == 8 and torch.cuda.get_device_capability() >= (9, 0):
            assert bool(plan.get("kv_tma")) == (batch == 40)   # large grids only at page 16
        got = _run(b)
        assert torch.equal(got, want), (ps, float((got.float() - want.float()).abs().max()))


def test_misaligned_caches_and_refused_tensor_maps_are_named():
    """A cache view that does not start 16-byte aligned is refused before launch, naming it, on
    the tensor-map path (bf16 decode) and the cp.async one (a tree); a map the driver refuses
    names the driver's error."""
    from jitkern.ops import spec_dec_attention
    from jitkern.ops.tensor_map import paged_kv_map

    for tree in (False, True):   # (head_dim 80: padded, so copied by cp.async)
        a = random_paged_inputs([300, 70], [random_eagle_tree(5, random.Random(1))] * 2 if tree
                                else [1, 1], num_heads=8, num_kv_heads=2,
                                head_dim=80 if tree else 128,
                                tree=tree, generator=torch.Generator().manual_seed(3))
        for name in ("k_cache", "v_cache"):
            c = a[name]
            flat = torch.empty(c.numel() + 8, dtype=c.dtype, device=c.device)
            b = dict(a, **{name: flat[1:1 + c.numel()].view(c.shape)})
            with pytest.raises(ValueError, match=f"{name} must start at a 16-byte aligned "
                                                 f"address.*storage offset of 1 elements"):
                spec_dec_attention(**b)
    pool = torch.zeros(4 * 64 * 2 * 64, dtype=torch.bfloat16, device="cuda").view(4, 64, 2, 64)
    assert paged_kv_map(pool, "NHD", 64) != bytes(128)
    with pytest.raises(RuntimeError, match="cuTensorMapEncodeTiled failed: CUDA_ERROR_INVALID_VALUE"):
        paged_kv_map(pool, "NHD", 0)   # an empty box
