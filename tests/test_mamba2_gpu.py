"""The Mamba2 MTP kernels against the float64 reference on the GPU.

A randomized sweep (fresh inputs each run; the seed is in every failure message) over the real
shapes of the spec plus odd ones, random draft trees, slot permutations with pads, every optional
tensor on and off, every dtype mix and both argument forms. Outputs and intermediate states are
NaN-poisoned before the launch; outputs, intermediate states and the final state are checked.
MAMBA2_SWEEP_CASES sets the sweep size (default 240; a small value for memcheck runs).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytestmark = pytest.mark.gpu

SEED = int.from_bytes(os.urandom(4), "little")
CASES = int(os.environ.get("MAMBA2_SWEEP_CASES", "240"))
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [  # (H, P, N, G): the spec's models, then odd ones
    (128, 64, 128, 8), (32, 64, 128, 2), (64, 64, 128, 8), (128, 80, 128, 8), (32, 64, 256, 2),
    (16, 64, 128, 4), (4, 80, 16, 1), (6, 8, 48, 3), (8, 16, 512, 8), (3, 24, 64, 3),
    (2, 8, 16, 2), (5, 40, 80, 1),
]


def _ops():
    from jitkern.ops import mamba2_commit_accepted_state, mamba2_mtp_ssm_update

    return mamba2_mtp_ssm_update, mamba2_commit_accepted_state


def _ref():
    from jitkern.reference.mamba2 import (mamba2_commit_accepted_state_ref,
                                          mamba2_mtp_ssm_update_ref)

    return mamba2_mtp_ssm_update_ref, mamba2_commit_accepted_state_ref


def _random_case(rng: random.Random) -> dict:
    H, P, N, G = rng.choice(SHAPES)
    T = rng.choice([1, 1, 2, 3, 4, 5, 8, 16])
    Bt = rng.choice([1, 2, 3, 5, 8])
    c = dict(H=H, P=P, N=N, G=G, T=T, Bt=Bt,
             state=rng.choice(list(DT)), inp=rng.choice(list(DT)), dt=rng.choice(list(DT)),
             A=rng.choice(["fp32", "fp32", "bf16", "fp16"]), Dd=rng.choice(list(DT)),
             biasd=rng.choice(list(DT)),
             has_D=rng.random() < 0.6, has_z=rng.random() < 0.5, has_bias=rng.random() < 0.6,
             softplus=rng.random() < 0.7, inter=rng.random() < 0.7,
             sbi=rng.random() < 0.7, iidx=rng.random() < 0.5, pads=rng.random() < 0.5,
             pad_id=rng.choice([-1, -1, 9999]), expanded=rng.random() < 0.4,
             packed=rng.random() < 0.3, shift=rng.randint(0, 7) if rng.random() < 0.5 else 0,
             pool_stride=rng.random() < 0.3,
             disable=rng.random() < 0.2, squeeze=rng.random() < 0.5, longer_inter=rng.random() < 0.3)
    c["tree"] = c["inter"] and rng.random() < 0.6
    c["tree_kind"] = rng.choice(["random", "chain", "binary", "garbage"])
    return c


def _tolerance(c) -> float:
    all32 = all(c[k] == "fp32" for k in ("state", "inp", "dt", "A")) and \
        (not c["has_D"] or c["Dd"] == "fp32") and (not c["has_bias"] or c["biasd"] == "fp32")
    return 1e-4 if all32 else 2e-2


def _parents(rng: random.Random, kind: str, Bt: int, T: int) -> torch.Tensor:
    par = torch.empty(Bt, T, dtype=torch.int32)
    for b in range(Bt):
        for t in range(T):
            if kind == "chain":
                p = t - 1
            elif kind == "binary":
                p = (t - 1) // 2
            elif kind == "garbage":   # parents that must be ignored: >= t, or < -1
                p = rng.choice([-1, t, t + 3, -5, 100]) if t else -1
            else:
                p = rng.randint(-1, t - 1)
            par[b, t] = p
    return par


def _build(c, rng: random.Random, dev="cuda"):
    """Tensors of one case: (kwargs for the op, and what the checks need)."""
    H, P, N, G, T, Bt = c["H"], c["P"], c["N"], c["G"], c["T"], c["Bt"]
    sd, idt, ddt = DT[c["state"]], DT[c["inp"]], DT[c["dt"]]
    S = Bt + rng.randint(0, 3) if c["sbi"] else Bt + rng.randint(0, 2)
    if c["pool_stride"]:   # the pool is one layer's slice of a larger cache
        big = torch.randn(S, 2, H, P, N, device=dev).mul_(0.5).to(sd)
        state = big[:, 1]
    else:
        state = torch.randn(S, H, P, N, device=dev).mul_(0.5).to(sd)
    lead = (Bt, T)
    if c["packed"]:   # x, B, C as views of one projection output (Mamba2's xBC)
        # shifted by c["shift"] elements: B/C rows off 16-byte alignment take the kernel's
        # scalar staging path instead of its vector one
        w = H * P + 2 * G * N
        xbc = (torch.randn(Bt, T, w + 8 + c["shift"], device=dev) * 0.5).to(idt)
        xbc = xbc[..., c["shift"]:]
        x = xbc[..., :H * P].unflatten(-1, (H, P))
        B = xbc[..., H * P:H * P + G * N].unflatten(-1, (G, N))
        C = xbc[..., H * P + G * N:w].unflatten(-1, (G, N))
    else:
        x = (torch.randn(*lead, H, P, device=dev) * 0.5).to(idt)
        B = (torch.randn(*lead, G, N, device=dev) * 0.5).to(idt)
        C = (torch.randn(*lead, G, N, device=dev) * 0.5).to(idt)
    # dt + dt_bias with softplus lands in O(0.1 .. 1); without softplus dt itself does
    if c["softplus"]:
        dt = (torch.randn(*lead, H, device=dev) * 0.5 - 1.0).to(ddt)
    else:
        dt = (torch.rand(*lead, H, device=dev) * 0.9 + 0.1).to(ddt)
    A = (-(torch.rand(H, device=dev) * 3.5 + 0.5)).to(DT[c["A"]])
    D = (torch.randn(H, device=dev) * 0.5).to(DT[c["Dd"]]) if c["has_D"] else None
    bias = ((torch.randn(H, device=dev) * 0.3 + (0.5 if c["softplus"] else 0.0))
            .to(DT[c["biasd"]])) if c["has_bias"] else None
    if c["has_bias"] and not c["softplus"]:
        bias = bias.abs().mul_(0.3)   # keep dt + bias positive and small
    z = (torch.randn(*lead, H, P, device=dev) * 0.5).to(idt) if c["has_z"] else None

    pad = c["pad_id"]
    sbi = None
    live = list(range(Bt))
    if c["sbi"]:
        slots = rng.sample(range(S), Bt)
        if c["pads"]:
            for b in rng.sample(range(Bt), rng.randint(1, max(1, Bt // 2))):
                slots[b] = pad
        live = [b for b in range(Bt) if slots[b] != pad]
        sbi = torch.tensor(slots, dtype=torch.int32, device=dev)
    inter = iidx = par = None
    if c["inter"]:
        T2 = T + (rng.randint(1, 3) if c["longer_inter"] else 0)
        if c["iidx"]:
            S2 = Bt + rng.randint(0, 2)
            iidx = torch.tensor(rng.sample(range(S2), Bt), dtype=torch.int32, device=dev)
        else:
            S2 = S + rng.randint(0, 1)
        inter = torch.full((S2, T2, H, P, N), float("nan"), device=dev, dtype=sd)
        if c["tree"]:
            par = _parents(rng, c["tree_kind"], Bt, T).to(dev)
    if c["expanded"]:
        dt = dt[..., None].expand(*lead, H, P)
        A = A[:, None, None].expand(H, P, N)
        D = D[:, None].expand(H, P) if D is not None else None
        bias = bias[:, None].expand(H, P) if bias is not None else None
    if c["squeeze"] and T == 1:   # the [Bt, H, P] form
        x, B, C, dt = x[:, 0], B[:, 0], C[:, 0], dt[:, 0]
        z = z[:, 0] if z is not None else None
    out = torch.full(x.shape, float("nan"), device=dev, dtype=idt)
    kw = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=bias,
              dt_softplus=c["softplus"], state_batch_indices=sbi, pad_slot_id=pad,
              intermediate_states=inter, intermediate_state_indices=iidx,
              retrieve_parent_token=par, disable_state_update=c["disable"], out=out)
    return kw, live


def _check(name, got, ref, tol, ctx):
    gn, rn = torch.isnan(got), torch.isnan(ref)
    assert torch.equal(gn, rn), f"{ctx}: {name}: NaN where the reference has none (or the " \
        f"reverse): {int((gn != rn).sum())} elements"
    if (~rn).any():
        g, r = got[~rn].double(), ref[~rn].double()
        scale = max(r.abs().max().item(), 1e-3)
        err = (g - r).abs().max().item() / scale
        assert err <= tol, f"{ctx}: {name}: max error {err:.3g} of scale {scale:.3g} > {tol}"


# the op's arguments in the order of jitkern.ops.mamba2._prepare_update
_OP_ARGS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus",
            "state_batch_indices", "pad_slot_id", "intermediate_states",
            "intermediate_state_indices", "retrieve_parent_token", "disable_state_update", "out")


def _reference(kw):
    """The float64 reference on copies of the op's state and intermediate states: (the
    reference's arguments, with the copies it updated, and its output)."""
    update_ref, _ = _ref()
    rkw = {k: v for k, v in kw.items() if k != "out"}
    rkw["state"] = kw["state"].clone()
    if kw["intermediate_states"] is not None:
        rkw["intermediate_states"] = kw["intermediate_states"].clone()
    return rkw, update_ref(**rkw)


def _check_writes(kw, rkw, y_ref, tol, ctx):
    """The op's output, state and intermediate states against the reference's."""
    _check("out", kw["out"], y_ref, tol, ctx)
    _check("state", kw["state"], rkw["state"], tol, ctx)
    if kw["intermediate_states"] is not None:
        _check("intermediate_states", kw["intermediate_states"], rkw["intermediate_states"],
               tol, ctx)


def _run_case(i: int):
    update, _ = _ops()
    rng = random.Random(SEED * 1000 + i)
    torch.manual_seed(SEED * 1000 + i)
    c = _random_case(rng)
    kw, live = _build(c, rng)
    ctx = f"seed {SEED} case {i} {c}"
    rkw, y_ref = _reference(kw)
    y = update(**kw)
    assert y is kw["out"]
    _check_writes(kw, rkw, y_ref, _tolerance(c), ctx)
    return c


@pytest.mark.parametrize("i", range(CASES))
def test_sweep(i):
    _run_case(i)


@pytest.mark.parametrize("state_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("T", [2, 8, 16])
def test_coarse_layout_of_the_op(state_dtype, T):
    """The op's coarse layout (2-byte chains on the grids coarse_pays picks: here the smallest
    batch of H = 32 that takes it on this GPU) against the float64 reference, pads and
    intermediate states included, and the kernel it ran is the coarse one."""
    from jitkern.families.mamba2 import layout_for_grid
    from jitkern.ops import mamba2 as m2
    from jitkern.ops.device import sm_count

    sms = sm_count(torch.device("cuda", torch.cuda.current_device()))
    bt = next(b for b in range(1, 512)
              if layout_for_grid(128, state_dtype, 64, False, T, 32, b, sms)["TPR"] == 4)
    update, _ = _ops()
    rng = random.Random(SEED + 11 + T)
    c = dict(_random_case(rng), H=32, P=64, N=128, G=2, T=T, Bt=bt, state=state_dtype, inp="bf16",
             dt="bf16", A="fp32", Dd="bf16", biasd="bf16", has_D=True, has_z=rng.random() < 0.5,
             has_bias=True, softplus=True, inter=True, tree=False, sbi=True, pads=True,
             expanded=False, squeeze=False, disable=False)
    kw, _ = _build(c, rng)
    rkw, y_ref = _reference(kw)
    name = m2._prepare_update(*[kw[k] for k in _OP_ARGS]).kernel.name
    assert "TPR=4," in name and "ROWS=32," in name, name
    assert update(**kw) is kw["out"]
    _check_writes(kw, rkw, y_ref, 2e-2, f"seed {SEED} coarse batch {bt} {c}")


@pytest.mark.parametrize("tiling", [(32, 8, 1), (16, 16, 1), (8, 16, 2), (8, 64, 4), (4, 64, 2),
                                    (4, 32, 4), (4, 32, 2), (16, 32, 2), (2, 32, 2)])
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_tilings(tiling, state_dtype, prefetch):
    """Every tiling the benchmark's sweep may choose computes the same thing (tree, pads, z, D),
    with the tree's parent nodes prefetched one step ahead or read into the state's registers."""
    from jitkern.ops import mamba2 as m2

    rng = random.Random(SEED + 7)
    c = dict(_random_case(rng), H=8, P=64, N=128, G=2, T=8, Bt=4, state=state_dtype, inp="bf16",
             dt="bf16", A="fp32", Dd="bf16", biasd="bf16", has_D=True, has_z=True, has_bias=True,
             softplus=True, inter=True, tree=True, tree_kind="random", sbi=True, pads=True,
             iidx=False, expanded=False, squeeze=False, disable=False)
    tpr, rows, rpt = tiling
    if state_dtype == "fp32" and tpr < 4 or state_dtype == "bf16" and tpr > 16:
        pytest.skip("not a valid tiling for this state dtype")
    kw, _ = _build(c, rng)
    rkw, y_ref = _reference(kw)
    args = [kw[k] for k in _OP_ARGS]
    plan = m2._prepare_update(*args, tiling=tiling + (prefetch,))
    assert f"tree_prefetch={int(prefetch)}" in plan.kernel.name   # the variant asked for ran
    a = dict(zip(("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "sbi",
                  "pad", "inter", "iidx", "parent", "disable", "out"), args))
    m2._launch_update(plan, a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"],
                      a["dt_bias"], a["sbi"], a["pad"], a["inter"], a["iidx"], a["parent"],
                      a["disable"], a["out"])
    _check_writes(kw, rkw, y_ref, 2e-2,
                  f"seed {SEED} tiling {tiling} prefetch {prefetch} {state_dtype}")


def test_sweep_covers_the_space():
    """The sweep's generator reaches every feature (so a green sweep means something)."""
    rng_cases = [_random_case(random.Random(SEED * 1000 + i)) for i in range(CASES)]
    if CASES < 200:
        pytest.skip("reduced sweep")
    for key in ("has_D", "has_z", "has_bias", "softplus", "inter", "tree", "sbi", "iidx", "pads",
                "expanded", "packed", "pool_stride", "disable"):
        assert {c[key] for c in rng_cases} == {False, True}, key
    assert {c["state"] for c in rng_cases} == set(DT)
    shifted = [c for c in rng_cases if c["packed"] and c["shift"] % 8]
    assert {c["state"] for c in shifted} == set(DT) and {c["inp"] for c in shifted} == set(DT)
    assert {c["N"] for c in rng_cases} >= {16, 128, 512}
    assert 80 in {c["P"] for c in rng_cases}


def _nemotron(Bt=4, T=4, state_dtype=torch.float32, dev="cuda", salt=0):
    H, P, N, G = 32, 64, 128, 2
    S = Bt + 2
    g = torch.Generator(device=dev).manual_seed(SEED + salt)
    r = lambda *s, dt=torch.bfloat16: (torch.randn(*s, device=dev, generator=g) * 0.5).to(dt)  # noqa: E731
    kw = dict(state=r(S, H, P, N, dt=state_dtype), x=r(Bt, T, H, P), dt=r(Bt, T, H) - 1,
              A=-(torch.rand(H, device=dev, generator=g) * 3 + 0.5), B=r(Bt, T, G, N),
              C=r(Bt, T, G, N), D=r(H), dt_bias=r(H) + 0.5, dt_softplus=True,
              state_batch_indices=torch.tensor([1, -1, 0, 3][:Bt], dtype=torch.int32, device=dev),
              intermediate_states=torch.full((S, T, H, P, N), float("nan"), device=dev,
                                             dtype=state_dtype),
              retrieve_parent_token=torch.tensor([[-1, 0, 0, 1]] * Bt, dtype=torch.int32,
                                                 device=dev)[:, :T].contiguous(),
              out=torch.full((Bt, T, H, P), float("nan"), device=dev, dtype=torch.bfloat16))
    return kw


def test_graph_capture_replay_is_identical():
    update, commit = _ops()
    kw = _nemotron()
    state0 = kw["state"].clone()
    accepted = torch.tensor([2, 0, -1, 3], dtype=torch.int32, device="cuda")

    def step():
        update(**kw)
        commit(kw["state"], kw["intermediate_states"], accepted,
               state_batch_indices=kw["state_batch_indices"])

    step()   # warm: compile, load
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    kw["state"].copy_(state0)
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        fresh = _nemotron(salt=trial + 1)   # new random inputs copied into the captured buffers
        for k in ("x", "dt", "B", "C"):
            kw[k].copy_(fresh[k])
        kw["state"].copy_(state0)
        kw["out"].fill_(float("nan"))
        kw["intermediate_states"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got = (kw["out"].clone(), kw["state"].clone(), kw["intermediate_states"].clone())
        kw["state"].copy_(state0)
        kw["out"].fill_(float("nan"))
        kw["intermediate_states"].fill_(float("nan"))
        step()
        torch.cuda.synchronize()
        want = (kw["out"], kw["state"], kw["intermediate_states"])
        for a, b in zip(got, want):
            assert torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))
        assert not torch.isnan(got[0][[0, 2, 3]]).any()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_commit_matches_reference(state_dtype):
    _, commit = _ops()
    _, commit_ref = _ref()
    S, S2, T, H, P, N = 7, 6, 5, 8, 16, 64   # five sequences (accepted, sbi below)
    state = torch.randn(S, H, P, N, device="cuda").to(state_dtype)
    inter = torch.randn(S2, T, H, P, N, device="cuda").to(state_dtype)
    accepted = torch.tensor([3, -1, 0, 4, 2], dtype=torch.int32, device="cuda")
    sbi = torch.tensor([6, 2, -1, 0, 4], dtype=torch.int32, device="cuda")
    iidx = torch.tensor([1, 0, 5, 2, 3], dtype=torch.int32, device="cuda")
    ref = commit_ref(state.clone(), inter, accepted, state_batch_indices=sbi,
                     intermediate_state_indices=iidx)
    got = commit(state, inter, accepted, state_batch_indices=sbi, intermediate_state_indices=iidx)
    assert got is state and torch.equal(state, ref)
    assert not torch.equal(state, torch.zeros_like(state))


def test_commit_default_indices_and_pool_stride():
    _, commit = _ops()
    _, commit_ref = _ref()
    big = torch.randn(4, 3, 2, 8, 32, device="cuda")
    big0 = big.clone()
    state = big[:, 1]                      # slot stride 3 * [H, P, N]
    inter = torch.randn(4, 3, 2, 8, 32, device="cuda")
    accepted = torch.tensor([1, 2, -1], dtype=torch.int32, device="cuda")
    ref = commit_ref(state.clone(), inter, accepted)
    commit(state, inter, accepted)
    assert torch.equal(state, ref) and not torch.equal(state, big0[:, 1])
    # the neighbouring layers of the cache are untouched
    assert torch.equal(big[:, 0], big0[:, 0]) and torch.equal(big[:, 2], big0[:, 2])


def test_out_of_range_indices_give_nan_and_leave_state():
    update, _ = _ops()
    kw = _nemotron(Bt=4, T=2)
    kw["retrieve_parent_token"] = None
    kw["state_batch_indices"] = torch.tensor([0, 50, -3, 1], dtype=torch.int32, device="cuda")
    state0 = kw["state"].clone()
    update(**kw)
    assert torch.isnan(kw["out"][1:3].float()).all()
    assert not torch.isnan(kw["out"][[0, 3]].float()).any()
    assert torch.equal(kw["state"][2:], state0[2:])


def test_side_stream_and_repeat_calls():
    update, _ = _ops()
    update_ref, _ = _ref()
    kw = _nemotron(Bt=3, T=3)
    rkw = {k: v for k, v in kw.items() if k != "out"}
    rkw["state"] = kw["state"].clone()
    rkw["intermediate_states"] = kw["intermediate_states"].clone()
    y_ref = update_ref(**rkw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        update(**kw)
    torch.cuda.current_stream().wait_stream(s)
    _check("out", kw["out"], y_ref, 2e-2, "side stream")
    _check("state", kw["state"], rkw["state"], 2e-2, "side stream")


def test_torch_compile_uses_the_custom_op():
    update, _ = _ops()
    kw = _nemotron(Bt=2, T=2)
    kw["retrieve_parent_token"] = None
    kw["state_batch_indices"] = None
    eager = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    update(**eager)

    @torch.compile(fullgraph=True)
    def f(state, x, dt, A, B, C, D, dt_bias, inter, out):
        update(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True,
               intermediate_states=inter, out=out)
        return out * 2

    y2 = f(kw["state"], kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["dt_bias"],
           kw["intermediate_states"], kw["out"])
    assert torch.equal(y2, eager["out"] * 2)
    assert torch.equal(kw["state"], eager["state"])
