"""Every user error of the Mamba2 MTP ops, with its message (CPU), and the family's warm-up set
compiled for Hopper without a GPU.

The ops check dtypes, shapes, strides and pool sizes before the device, so CPU tensors reach
every check but the device ones; those (and pointer alignment) need CUDA tensors and are marked.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import jitkern
from jitkern.families.mamba2 import (MAMBA2, chunks_per_row, grid_blocks, layout_for_grid,
                                     nemotron_config, pick_layout, pick_tiling)
from jitkern.ops import mamba2_commit_accepted_state as commit
from jitkern.ops import mamba2_mtp_ssm_update as update
from jitkern.ops.signature import PlanCache

Bt, T, H, P, N, G, S = 3, 4, 4, 8, 32, 2, 5


def base(dev="cpu", **over):
    """Valid arguments of a small problem; ``over`` replaces some."""
    r = lambda *s, dt=torch.bfloat16: (torch.randn(*s) * 0.5).to(dt).to(dev)  # noqa: E731
    kw = dict(state=r(S, H, P, N, dt=torch.float32), x=r(Bt, T, H, P), dt=r(Bt, T, H),
              A=-torch.rand(H, device=dev), B=r(Bt, T, G, N), C=r(Bt, T, G, N), D=r(H),
              z=r(Bt, T, H, P), dt_bias=r(H), dt_softplus=True,
              state_batch_indices=torch.tensor([2, 0, -1], dtype=torch.int32, device=dev),
              pad_slot_id=-1,
              intermediate_states=torch.empty(S, T, H, P, N, device=dev),
              intermediate_state_indices=None,
              retrieve_parent_token=torch.tensor([[-1, 0, 0, 1]] * Bt, dtype=torch.int32,
                                                 device=dev),
              disable_state_update=False, out=None)
    kw.update(over)
    return kw


def raises(exc, match, **over):
    kw = base(**over)
    with pytest.raises(exc, match=match):
        update(**kw)


def test_valid_cpu_arguments_reach_the_device_check():
    # the base problem passes every check but the last: it is not on a GPU
    with pytest.raises(ValueError, match=r"state must be a CUDA tensor, got device cpu"):
        update(**base())


def test_meta_tensors_reach_the_device_check():
    with pytest.raises(ValueError, match=r"state must be a CUDA tensor, got device meta"):
        update(**base(dev="meta"))


# ----------------------------------------------------------------------------- state

def test_state_type_dtype_rank():
    raises(TypeError, r"state must be a torch.Tensor, got list", state=[1.0])
    raises(TypeError, r"state must be float32, bfloat16 or float16, got torch.int32",
           state=torch.zeros(S, H, P, N, dtype=torch.int32))
    raises(ValueError, r"state must have shape \[S, H, P, N\], got \[5, 4, 256\]",
           state=torch.zeros(S, H, P * N))


@pytest.mark.parametrize("n", [40, 8, 528])
def test_state_d_state_rule(n):
    raises(ValueError, rf"d_state N must be a multiple of 16 in \[16, 512\], got {n}",
           state=torch.zeros(S, H, P, n))


@pytest.mark.parametrize("p", [12, 0])
def test_state_head_dim_rule(p):
    raises(ValueError, rf"head_dim P must be a positive multiple of 8, got {p}",
           state=torch.zeros(S, H, p, N))


def test_state_needs_a_slot():
    raises(ValueError, r"state must have at least one slot", state=torch.zeros(0, H, P, N))


def test_state_inner_layout():
    st = torch.zeros(S, H, N, P).transpose(2, 3)
    raises(ValueError, r"state must be contiguous over \[H, P, N\] \(strides \[256, 32, 1\]\), "
           r"got strides \[256, 1, 8\]", state=st)
    # slot stride 1028 floats: not a whole number of 16-byte vectors
    odd = torch.zeros(S * (H * P * N + 4) + 1)[1:].as_strided((S, H, P, N),
                                                            (H * P * N + 1, P * N, N, 1))
    raises(ValueError, r"state's slot stride must be a multiple of 4 elements \(16 bytes\), "
           r"got 1025", state=odd)


# ----------------------------------------------------------------------------- x, B, C, z, out

def test_x_rules():
    raises(TypeError, r"x must be a torch.Tensor, got ndarray", x=torch.zeros(1).numpy())
    raises(TypeError, r"x must be float32, bfloat16 or float16, got torch.float64",
           x=torch.zeros(Bt, T, H, P, dtype=torch.float64))
    raises(ValueError, r"x must have shape \[Bt, T, H, P\] = \[3, 4, 4, 8\], got \[3, 4, 3, 8\]",
           x=torch.zeros(Bt, T, H - 1, P, dtype=torch.bfloat16))
    raises(ValueError, r"x must have shape \[Bt, T, H, P\] or \[Bt, H, P\], got \[3\]",
           x=torch.zeros(Bt, dtype=torch.bfloat16))
    raises(ValueError, r"x must have stride 1 in its last dimension",
           x=torch.zeros(Bt, T, H, 2 * P, dtype=torch.bfloat16)[..., ::2])


@pytest.mark.parametrize("t", [0, 17])
def test_token_count_rule(t):
    kw = dict(x=torch.zeros(Bt, t, H, P, dtype=torch.bfloat16),
              B=torch.zeros(Bt, t, G, N, dtype=torch.bfloat16),
              C=torch.zeros(Bt, t, G, N, dtype=torch.bfloat16))
    raises(ValueError, rf"x's token count T must be in \[1, 16\], got {t}", **kw)


def test_B_C_rules():
    raises(TypeError, r"B must have the dtype of x \(torch.bfloat16\), got torch.float32",
           B=torch.zeros(Bt, T, G, N))
    raises(ValueError, r"B must have shape \[Bt, T, G, N\] = \[3, 4, 'G', 32\], got \[3, 4, 2, 16\]",
           B=torch.zeros(Bt, T, G, 16, dtype=torch.bfloat16))
    raises(ValueError, r"C must have shape \[Bt, T, G, N\]",
           C=torch.zeros(Bt, 2, G, N, dtype=torch.bfloat16))
    raises(ValueError, r"C must have the group count of B \(2\), got 1",
           C=torch.zeros(Bt, T, 1, N, dtype=torch.bfloat16))
    raises(ValueError, r"C must have stride 1 in its last dimension",
           C=torch.zeros(Bt, T, G, 2 * N, dtype=torch.bfloat16)[..., ::2])


@pytest.mark.parametrize("g", [0, 3])
def test_group_rule(g):
    kw = dict(B=torch.zeros(Bt, T, g, N, dtype=torch.bfloat16),
              C=torch.zeros(Bt, T, g, N, dtype=torch.bfloat16))
    raises(ValueError, rf"the group count G \(B.shape\[-2\] = {g}\) must be positive and divide "
           rf"the head count H = 4", **kw)


def test_z_and_out_rules():
    raises(TypeError, r"z must have the dtype of x", z=torch.zeros(Bt, T, H, P))
    raises(ValueError, r"z must have shape \[Bt, T, H, P\] = \[3, 4, 4, 8\]",
           z=torch.zeros(Bt, T, H, P + 8, dtype=torch.bfloat16))
    raises(TypeError, r"out must have the dtype of x", out=torch.zeros(Bt, T, H, P))
    raises(ValueError, r"out must have shape \[Bt, T, H, P\] = \[3, 4, 4, 8\], got \[3, 4, 4\]",
           out=torch.zeros(Bt, T, H, dtype=torch.bfloat16))
    raises(ValueError, r"out must have stride 1 in its last dimension",
           out=torch.zeros(Bt, T, H, 2 * P, dtype=torch.bfloat16)[..., 1::2])
    raises(TypeError, r"out must be a torch.Tensor, got tuple", out=(1,))


# ----------------------------------------------------------------------------- dt, A, D, dt_bias

def test_dt_rules():
    raises(TypeError, r"dt must be float32, bfloat16 or float16, got torch.int64",
           dt=torch.zeros(Bt, T, H, dtype=torch.long))
    raises(ValueError, r"dt must have shape \[Bt, T, H\] = \[3, 4, 4\] or \[Bt, T, H, P\] with "
           r"stride 0 over P, got \[3, 4, 5\]", dt=torch.zeros(Bt, T, H + 1))
    raises(ValueError, r"dt given as \[Bt, T, H, P\] must have stride 0 over P \(one value per "
           r"head\)", dt=torch.zeros(Bt, T, H, P))


def test_expanded_forms_are_accepted():
    d = torch.randn(Bt, T, H)
    kw = base(dt=d[..., None].expand(Bt, T, H, P), A=(-torch.rand(H))[:, None, None].expand(H, P, N),
              D=torch.randn(H)[:, None].expand(H, P), dt_bias=torch.randn(H)[:, None].expand(H, P))
    with pytest.raises(ValueError, match="state must be a CUDA tensor"):
        update(**kw)


def test_A_rules():
    raises(ValueError, r"A must have shape \[H\] = \[4\] \(or \[H, P, N\] with stride 0 after H\), "
           r"got \[5\]", A=torch.zeros(H + 1))
    raises(ValueError, r"A must have shape \[H\] = \[4\] or \[H, P, N\] = \[4, 8, 32\], got \[4, 8\]",
           A=torch.zeros(H, P))
    raises(ValueError, r"A given as \[H, P, N\] must have stride 0 over every dimension after H",
           A=torch.zeros(H, P, N))
    raises(TypeError, r"A must be float32, bfloat16 or float16, got torch.int32",
           A=torch.zeros(H, dtype=torch.int32))


def test_D_and_dt_bias_rules():
    raises(ValueError, r"D must have shape \[H\] = \[4\] or \[H, P\] = \[4, 8\], got \[4, 9\]",
           D=torch.zeros(H, 9))
    raises(ValueError, r"D given as \[H, P\] must have stride 0", D=torch.zeros(H, P))
    raises(TypeError, r"dt_bias must be float32, bfloat16 or float16, got torch.bool",
           dt_bias=torch.zeros(H, dtype=torch.bool))
    raises(ValueError, r"dt_bias must have shape \[H\] = \[4\]", dt_bias=torch.zeros(2))
    raises(TypeError, r"D must be a torch.Tensor, got float", D=1.0)


# ----------------------------------------------------------------------------- scalars

def test_scalar_rules():
    raises(TypeError, r"dt_softplus must be a bool, got int", dt_softplus=1)
    raises(TypeError, r"disable_state_update must be a bool, got NoneType",
           disable_state_update=None)
    raises(TypeError, r"pad_slot_id must be an int, got float", pad_slot_id=-1.0)
    raises(TypeError, r"pad_slot_id must be an int, got bool", pad_slot_id=True)
    raises(ValueError, r"pad_slot_id must fit in int32, got 4294967296", pad_slot_id=2**32)


# ----------------------------------------------------------------------------- indices, pools

def test_state_batch_indices_rules():
    raises(TypeError, r"state_batch_indices must be int32, got torch.int64",
           state_batch_indices=torch.tensor([0, 1, 2]))
    raises(ValueError, r"state_batch_indices must have shape \[Bt\] = \[3\], got \[2\]",
           state_batch_indices=torch.tensor([0, 1], dtype=torch.int32))
    raises(ValueError, r"state_batch_indices must be contiguous, got stride 2",
           state_batch_indices=torch.arange(6, dtype=torch.int32)[::2])


def test_pool_smaller_than_batch():
    raises(ValueError, r"state has 2 slots but the batch has Bt = 3 sequences: without "
           r"state_batch_indices", state=torch.zeros(2, H, P, N), state_batch_indices=None,
           intermediate_states=None, retrieve_parent_token=None)


def test_intermediate_rules():
    raises(ValueError, r"intermediate_state_indices needs intermediate_states",
           intermediate_states=None, retrieve_parent_token=None,
           intermediate_state_indices=torch.zeros(Bt, dtype=torch.int32))
    raises(ValueError, r"retrieve_parent_token \(tree mode\) needs intermediate_states",
           intermediate_states=None)
    raises(TypeError, r"intermediate_states must have the dtype of state \(torch.float32\), got "
           r"torch.bfloat16", intermediate_states=torch.zeros(S, T, H, P, N, dtype=torch.bfloat16))
    raises(ValueError, r"intermediate_states must have shape \[S2, T, H, P, N\] = \['S2', 4, 4, "
           r"8, 32\].*got \[5, 3, 4, 8, 32\]", intermediate_states=torch.zeros(S, T - 1, H, P, N))
    raises(ValueError, r"intermediate_states must be contiguous over \[T, H, P, N\]",
           intermediate_states=torch.zeros(S, H, T, P, N).transpose(1, 2))
    raises(ValueError, r"intermediate_states has 4 rows but without intermediate_state_indices "
           r"sequence b uses the row of its state slot, so S2 >= S = 5 is needed",
           intermediate_states=torch.zeros(S - 1, T, H, P, N))
    raises(ValueError, r"so S2 >= Bt = 3 is needed", state_batch_indices=None,
           intermediate_states=torch.zeros(2, T, H, P, N))
    raises(TypeError, r"intermediate_state_indices must be int32, got torch.int64",
           intermediate_state_indices=torch.zeros(Bt, dtype=torch.long))
    raises(ValueError, r"intermediate_states' slot stride must be a multiple of 4 elements",
           intermediate_states=torch.zeros(S * (T * H * P * N + 2))[:-1].as_strided(
               (S, T, H, P, N), (T * H * P * N + 2 - 1, H * P * N, P * N, N, 1)))


def test_longer_intermediate_step_axis_is_accepted():
    with pytest.raises(ValueError, match="state must be a CUDA tensor"):
        update(**base(intermediate_states=torch.zeros(S, T + 3, H, P, N)))


def test_parent_rules():
    raises(TypeError, r"retrieve_parent_token must be int32, got torch.int64",
           retrieve_parent_token=torch.zeros(Bt, T, dtype=torch.long))
    raises(ValueError, r"retrieve_parent_token must have shape \[Bt, T\] = \[3, 4\], got \[3, 5\]",
           retrieve_parent_token=torch.zeros(Bt, T + 1, dtype=torch.int32))
    raises(ValueError, r"retrieve_parent_token must be contiguous",
           retrieve_parent_token=torch.zeros(T, Bt, dtype=torch.int32).t())


def test_squeezed_T1_form():
    kw = base(x=torch.zeros(Bt, H, P, dtype=torch.bfloat16), dt=torch.zeros(Bt, H),
              B=torch.zeros(Bt, G, N, dtype=torch.bfloat16),
              C=torch.zeros(Bt, G, N, dtype=torch.bfloat16), z=None,
              retrieve_parent_token=None, intermediate_states=None)
    with pytest.raises(ValueError, match="state must be a CUDA tensor"):
        update(**kw)
    kw["B"] = torch.zeros(Bt, 1, G, N, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"B must have shape \[Bt, G, N\] = \[3, 'G', 32\]"):
        update(**kw)


# ----------------------------------------------------------------------------- commit

def commit_base(dev="cpu", **over):
    kw = dict(state=torch.zeros(S, H, P, N, device=dev),
              intermediate_states=torch.zeros(S, T, H, P, N, device=dev),
              accepted_step=torch.tensor([1, -1, 3], dtype=torch.int32, device=dev),
              state_batch_indices=None, intermediate_state_indices=None, pad_slot_id=-1)
    kw.update(over)
    return kw


def commit_raises(exc, match, **over):
    kw = commit_base(**over)
    state, inter, acc = kw.pop("state"), kw.pop("intermediate_states"), kw.pop("accepted_step")
    with pytest.raises(exc, match=match):
        commit(state, inter, acc, **kw)


def test_commit_rules():
    commit_raises(ValueError, r"state must be a CUDA tensor, got device cpu")
    commit_raises(TypeError, r"state must be float32, bfloat16 or float16, got torch.int64",
                  state=torch.zeros(S, H, P, N, dtype=torch.long))
    commit_raises(ValueError, r"state must have shape \[S, H, P, N\]", state=torch.zeros(S, H))
    commit_raises(TypeError, r"intermediate_states must have the dtype of state",
                  intermediate_states=torch.zeros(S, T, H, P, N, dtype=torch.float16))
    commit_raises(ValueError, r"intermediate_states must have shape \[S2, T, H, P, N\] = "
                  r"\['S2', 'T', 4, 8, 32\] with T >= 1, got \[5, 4, 4, 8, 16\]",
                  intermediate_states=torch.zeros(S, T, H, P, 16))
    commit_raises(TypeError, r"accepted_step must be int32, got torch.int64",
                  accepted_step=torch.tensor([1, 2]))
    commit_raises(ValueError, r"accepted_step must have shape \[Bt\], got \[1, 3\]",
                  accepted_step=torch.zeros(1, 3, dtype=torch.int32))
    commit_raises(ValueError, r"state has 5 slots but the batch has Bt = 6",
                  accepted_step=torch.zeros(6, dtype=torch.int32))
    commit_raises(ValueError, r"intermediate_states has 2 rows .* S2 >= Bt = 3 is needed",
                  intermediate_states=torch.zeros(2, T, H, P, N))
    commit_raises(ValueError, r"intermediate_state_indices must have shape \[Bt\] = \[3\]",
                  intermediate_state_indices=torch.zeros(4, dtype=torch.int32))
    commit_raises(TypeError, r"state_batch_indices must be int32",
                  state_batch_indices=torch.zeros(3, dtype=torch.int16))
    commit_raises(TypeError, r"pad_slot_id must be an int, got str", pad_slot_id="-1")
    commit_raises(ValueError, r"state must be contiguous over \[H, P, N\]",
                  state=torch.zeros(S, P, H, N).transpose(1, 2))
    commit_raises(ValueError, r"intermediate_states must be contiguous over \[T, H, P, N\]",
                  intermediate_states=torch.zeros(S, H, T, P, N).transpose(1, 2))
    commit_raises(ValueError, r"intermediate_states' slot stride must be a multiple of 4 elements",
                  intermediate_states=torch.zeros(S * (T * H * P * N + 2))[:-1].as_strided(
                      (S, T, H, P, N), (T * H * P * N + 2 - 1, H * P * N, P * N, N, 1)))


# ----------------------------------------------------------------------------- GPU-only checks

@pytest.mark.gpu
def test_device_mismatch_names_the_argument():
    kw = base(dev="cuda")
    kw["x"] = kw["x"].cpu()
    with pytest.raises(ValueError, match=r"x must be on cuda:0 \(the device of state\), got cpu"):
        update(**kw)
    kw = base(dev="cuda")
    kw["retrieve_parent_token"] = kw["retrieve_parent_token"].cpu()
    with pytest.raises(ValueError, match=r"retrieve_parent_token must be on cuda:0"):
        update(**kw)
    kw = commit_base(dev="cuda")
    with pytest.raises(ValueError, match=r"accepted_step must be on cuda:0"):
        commit(kw["state"], kw["intermediate_states"], kw["accepted_step"].cpu())


@pytest.mark.gpu
def test_misaligned_pool_is_rejected():
    kw = base(dev="cuda")
    flat = torch.zeros(S * H * P * N + 1, device="cuda")
    kw["state"] = flat[1:].view(S, H, P, N)     # 4 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match=r"state must start at a 16-byte aligned address"):
        update(**kw)
    kw = commit_base(dev="cuda")
    kw["intermediate_states"] = torch.zeros(S * T * H * P * N + 2, device="cuda")[2:].view(
        S, T, H, P, N)
    with pytest.raises(ValueError, match=r"intermediate_states must start at a 16-byte aligned"):
        commit(kw["state"], kw["intermediate_states"], kw["accepted_step"])


# ----------------------------------------------------------------------------- the family

def test_family_configuration_errors():
    cfg = nemotron_config("fp32", tree=False)
    with pytest.raises(ValueError, match=r"tree=True needs intermediate=True"):
        MAMBA2.specialize(dict(cfg, tree=True, intermediate=False))
    with pytest.raises(ValueError, match=r"TPR=32 must divide the 2 16-byte chunks of a row "
                                         r"\(N=16, state bf16\)"):
        MAMBA2.specialize(dict(cfg, N=16, TPR=32, state_dtype="bf16"))
    with pytest.raises(ValueError, match=r"ROWS / RPT \* TPR = 16 threads must be a multiple "
                                         r"of 32"):
        MAMBA2.specialize(dict(cfg, TPR=8, ROWS=2, RPT=1))
    with pytest.raises(ValueError, match=r"RPT=4 must divide ROWS=2"):
        MAMBA2.specialize(dict(cfg, TPR=32, ROWS=2, RPT=4))
    with pytest.raises(ValueError, match=r"tree_prefetch=True needs tree=True"):
        MAMBA2.specialize(dict(cfg, tree_prefetch=True))
    with pytest.raises(ValueError, match=r"parameter 'tree_prefetch' = 1 is not allowed"):
        MAMBA2.specialize(dict(cfg, tree=True, tree_prefetch=1))
    with pytest.raises(ValueError, match=r"parameter 'N' = 24 is not allowed; allowed values: "
                                         r"multiples of 16 from 16 to 512"):
        MAMBA2.specialize(dict(cfg, N=24))


def test_tiling_is_valid_for_every_shape():
    for n, sd, p, tree, t in itertools.product(range(16, 513, 16), ("fp32", "bf16", "fp16"),
                                               range(8, 257, 8), (False, True), (1, 8)):
        tpr, rows, rpt = pick_tiling(n, sd, p, tree, t)
        assert chunks_per_row(n, sd) % tpr == 0 and rows % rpt == 0
        threads = rows // rpt * tpr
        assert threads % 32 == 0 and threads <= 1024
        MAMBA2.canonical(dict(nemotron_config(sd, tree=tree), N=n, TPR=tpr, ROWS=rows, RPT=rpt,
                              state_dtype=sd))
        lay = pick_layout(n, sd, p, tree, t)
        assert (lay["TPR"], lay["ROWS"], lay["RPT"]) == (tpr, rows, rpt)
        assert lay["tree_prefetch"] in ((False, True) if tree else (False,))
    # 2-byte states read tree parents into the registers they replace (no prefetch registers)
    assert not pick_layout(128, "bf16", 64, True, 8)["tree_prefetch"]
    # an explicit request is honoured where the shape allows it
    assert pick_tiling(128, "fp32", 64, threads=256, tpr=16, rpt=1) == (16, 16, 1)
    assert pick_tiling(128, "bf16", 80, threads=128, tpr=4, rpt=2) == (4, 16, 2)
    assert pick_tiling(16, "bf16", 8, tpr=4, rpt=2) == (2, 16, 1)   # masked rows past P


def test_small_grid_layout():
    # 2-byte states with T > 1: twice the threads per row in the same block, half the rows
    for sd in ("bf16", "fp16"):
        for tree in (False, True):
            big, small = (pick_layout(128, sd, 64, tree, 8, small_grid=g) for g in (False, True))
            assert (big["TPR"], big["ROWS"], big["RPT"]) == (8, 16, 2)
            assert (small["TPR"], small["ROWS"], small["RPT"]) == (16, 8, 2)
            assert small["ROWS"] // small["RPT"] * small["TPR"] == 64   # same block size
            assert grid_blocks(64, small["ROWS"], 32, 1) == 2 * grid_blocks(64, big["ROWS"], 32, 1)
            for n, p in itertools.product(range(16, 513, 16), range(8, 257, 8)):
                lay = pick_layout(n, sd, p, tree, 4, small_grid=True)
                MAMBA2.canonical(dict(nemotron_config(sd, tree=tree), N=n, **lay, state_dtype=sd))
                assert p % lay["ROWS"] == 0 or lay["ROWS"] * lay["TPR"] // lay["RPT"] == 32
    # the op's choice: the small-grid layout only when the default grid leaves SMs idle
    # (H = 32, batch 1: 128 blocks on 132 SMs; H = 128, batch 2: 1024 blocks)
    small = pick_layout(128, "bf16", 64, False, 8, small_grid=True)
    assert layout_for_grid(128, "bf16", 64, False, 8, 32, 1, 132) == small
    assert layout_for_grid(128, "bf16", 64, False, 8, 128, 2, 132) == pick_layout(128, "bf16",
                                                                                   64, False, 8)
    assert layout_for_grid(128, "fp32", 64, True, 8, 1, 1, 132) == pick_layout(128, "fp32", 64,
                                                                              True, 8)
    # one token, and fp32 states (no gain measured), keep their tiling
    assert pick_layout(128, "bf16", 64, False, 1, True) == pick_layout(128, "bf16", 64, False, 1)
    for tree in (False, True):
        assert pick_layout(128, "fp32", 64, tree, 8, True) == pick_layout(128, "fp32", 64, tree, 8)
    # the row's 16-byte chunks bound the threads per row: N = 16 bf16 has two chunks
    assert pick_layout(16, "bf16", 64, False, 8, True)["TPR"] <= 2
    # the warm-up set carries every layout of the 2-byte multi-token kernels
    key = lambda c: tuple(sorted(c.items()))  # noqa: E731
    warm = set(map(key, MAMBA2.warmup_configs()))
    for tree in (False, True):
        assert key(nemotron_config("bf16", tree, small_grid=True)) in warm
        assert key(nemotron_config("bf16", tree)) in warm
    assert key(nemotron_config("bf16", False, coarse=True)) in warm


def _tiling(layout):
    return layout["TPR"], layout["ROWS"], layout["RPT"]


def test_coarse_layout():
    # 2-byte chains with T > 1: half the threads per row in the same 64-thread block
    for sd in ("bf16", "fp16"):
        for t in (2, 4, 8, 16):
            assert _tiling(pick_layout(128, sd, 64, False, t)) == (8, 16, 2)
            assert _tiling(pick_layout(128, sd, 64, False, t, coarse=True)) == (4, 32, 2)
    # trees, one token, fp32 states, and rows a thread of the default holds differently (other
    # d_state) or head dims without 32-row blocks keep the default
    for args in ((128, "bf16", 64, True, 8), (128, "bf16", 64, False, 1),
                 (128, "fp32", 64, False, 8), (256, "bf16", 64, False, 8),
                 (64, "bf16", 64, False, 8), (128, "bf16", 80, False, 8)):
        assert pick_layout(*args, coarse=True) == pick_layout(*args), args
    # the op's choice on 132 SMs (the grids measured; P = 64: 4 default blocks a head)
    coarse_batches = {128: {1, 4, 8}, 32: {2, 4, 15, 16, 32}}
    for h, coarse in coarse_batches.items():
        for bt in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 15, 16, 20, 24, 28, 32, 36, 40, 48, 64, 128):
            for sd, t in (("bf16", 8), ("fp16", 4)):
                got = _tiling(layout_for_grid(128, sd, 64, False, t, h, bt, 132))
                want = ((16, 8, 2) if grid_blocks(64, 16, h, bt) < 132
                        else (4, 32, 2) if bt in coarse else (8, 16, 2))
                assert got == want, (h, bt, sd, t)
            # trees and fp32 states never take it
            assert _tiling(layout_for_grid(128, "bf16", 64, True, 8, h, bt, 132)) in {(8, 16, 2),
                                                                                     (16, 8, 2)}
            assert _tiling(layout_for_grid(128, "fp32", 64, False, 8, h, bt, 132)) == (16, 16, 2)


def test_coarse_pays_rounds():
    from jitkern.families.mamba2 import coarse_pays, resident_blocks

    assert resident_blocks(72, 64) == 14 and resident_blocks(120, 64) == 8
    assert resident_blocks(73, 64) == 12          # 80 registers allocated a thread
    assert resident_blocks(16, 64) == 32          # the per-SM block limit
    assert resident_blocks(32, 1024) == 2         # the per-SM thread limit
    # at most 4 default blocks on the busiest SM: coarse only without extra work there
    assert coarse_pays(512, 256, 132) and coarse_pays(256, 128, 132)
    assert not coarse_pays(384, 192, 132)         # 3 blocks against 2 x 2
    # rounds of 14 default / 8 coarse blocks per SM
    assert coarse_pays(2048, 1024, 132)           # 2 rounds against 1
    assert coarse_pays(4096, 2048, 132)           # 3 against 2
    assert not coarse_pays(2560, 1280, 132)       # 2 against 2
    assert not coarse_pays(1024, 512, 132)        # 1 round
    assert not coarse_pays(6144, 3072, 132)       # 4 rounds: bandwidth-bound
    # scales with the SM count: the same grids per SM on 114 SMs
    assert coarse_pays(114 * 16, 114 * 8, 114) and not coarse_pays(114 * 20, 114 * 10, 114)


def _cubin_registers(cubin: bytes) -> dict:
    """{kernel symbol: registers a thread}, from the cubin's .nv.info section (EIATTR_REGCOUNT
    attributes: the counts ptxas reports with -v, whatever NVRTC prints in its log)."""
    import struct

    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    # ELF64 section headers: name, type, flags, addr, offset, size, link, info, align, entsize
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstr(off):
        return cubin[off:cubin.index(b"\0", off)].decode()

    names = [cstr(hdrs[shstrndx][4] + h[0]) for h in hdrs]
    symtab = hdrs[names.index(".symtab")]
    strtab = hdrs[symtab[6]]
    info = hdrs[names.index(".nv.info")]
    off, end, out = info[4], info[4] + info[5], {}
    while off < end:   # attributes: format, id, then a value by format
        fmt, attr = cubin[off], cubin[off + 1]
        if fmt == 0x04:   # EIFMT_SVAL: 16-bit size, then the value
            size, = struct.unpack_from("<H", cubin, off + 2)
            if attr == 0x2F:   # EIATTR_REGCOUNT: (symbol index, registers)
                sym, regs = struct.unpack_from("<II", cubin, off + 4)
                name, = struct.unpack_from("<I", cubin, symtab[4] + 24 * sym)   # Elf64_Sym
                out[cstr(strtab[4] + name)] = regs
            off += 4 + size
        else:             # EIFMT_HVAL / BVAL: a 16-bit value; NVAL: none
            off += 4 if fmt in (0x02, 0x03) else 2
    return out


@pytest.mark.parametrize("coarse", [False, True])
def test_chain_registers_match_coarse_pays(coarse, own_cache):
    """coarse_pays counts resident blocks from CHAIN_REGISTERS: the kernels must still use them
    (a kernel change that moves them changes the rounds, and the rule needs measuring again)."""
    from jitkern.families.mamba2 import CHAIN_REGISTERS, CHAIN_THREADS, resident_blocks

    for t in (4, 8):
        cubin = jitkern.compile(MAMBA2, nemotron_config("bf16", False, T=t, coarse=coarse),
                                arch="sm_90").cubin
        regs = [n for k, n in _cubin_registers(cubin).items() if "mtp_ssm_update" in k]
        assert len(regs) == 1, _cubin_registers(cubin)
        regs = regs[0]
        want = CHAIN_REGISTERS["coarse" if coarse else "default"]
        assert resident_blocks(regs, CHAIN_THREADS) == resident_blocks(want, CHAIN_THREADS), \
            (t, regs, want)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(tmp_path / "cache"))
    from jitkern.service import KernelService

    fresh = KernelService()
    monkeypatch.setattr(jitkern.service, "SERVICE", fresh)
    yield
    if fresh._disk is not None:
        fresh._disk.close()


def test_warmup_set_compiles_for_hopper(own_cache):
    configs = MAMBA2.warmup_configs()
    # per state dtype: tree, chain, chain with T = 1 and plain decode; T = 1 has its own tiling.
    # bf16's tree and chain have a second (small-grid) layout and its chain a third (coarse);
    # fp32 uses one tiling for every grid.
    assert len(configs) == 11 and len({tuple(sorted(c.items())) for c in configs}) == 11
    assert sum(c["state_dtype"] == "fp32" for c in configs) == 4
    assert {(c["state_dtype"], c["tree"]) for c in configs} == {
        ("fp32", True), ("fp32", False), ("bf16", True), ("bf16", False)}
    for cfg in configs:
        e = jitkern.compile(MAMBA2, cfg, arch="sm_90")
        assert e.arch == "sm_90" and len(e.cubin) > 1000
        assert set(e.lowered_names) == {"update", "commit"}


def test_odd_configs_compile(own_cache):
    for cfg in (dict(N=16, TPR=2, ROWS=16, RPT=1, state_dtype="fp16", input_dtype="fp32"),
                dict(N=512, TPR=32, ROWS=8, RPT=1, state_dtype="fp32", has_z=True,
                     dt_softplus=False),
                dict(N=256, TPR=8, ROWS=64, RPT=4, state_dtype="fp32"),
                dict(N=48, TPR=2, ROWS=32, RPT=2, state_dtype="bf16", input_dtype="fp16",
                     dt_dtype="fp32", A_dtype="bf16", D_dtype="fp16", dt_bias_dtype="fp32"),
                dict(N=64, TPR=4, ROWS=64, RPT=2, state_dtype="fp32", tree_prefetch=False),
                dict(N=256, TPR=16, ROWS=16, RPT=2, state_dtype="bf16", tree_prefetch=True)):
        full = dict(nemotron_config("fp32", tree=True), **cfg)
        assert len(jitkern.compile(MAMBA2, full, arch="sm_90").cubin) > 1000


def test_a_cached_plan_still_checks_the_run_time_scalars(monkeypatch):
    """A repeated call skips the signature checks but not the scalars outside the signature."""
    from jitkern.ops import mamba2 as m2

    launched = []
    monkeypatch.setattr(m2, "_prepare_update", lambda *a, **k: "plan")
    monkeypatch.setattr(m2, "_launch_update", lambda plan, *a: launched.append(plan))
    monkeypatch.setattr(m2, "_plans", PlanCache())
    kw = base(out=torch.empty(Bt, T, H, P, dtype=torch.bfloat16))
    update(**kw)
    update(**kw)
    assert launched == ["plan", "plan"] and len(m2._plans) == 1
    for name, bad, exc in (("dt_softplus", 1, TypeError), ("disable_state_update", 0, TypeError),
                           ("pad_slot_id", 1.5, TypeError), ("pad_slot_id", -2**40, ValueError)):
        with pytest.raises(exc, match=name):
            update(**dict(kw, **{name: bad}))
    assert len(launched) == 2
