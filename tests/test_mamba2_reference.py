"""The float64 references of the Mamba2 MTP ops against cases computed by hand (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from jitkern.reference.mamba2 import (mamba2_commit_accepted_state_ref,
                                      mamba2_mtp_ssm_update_ref)

F64 = torch.float64


def _scalar_problem(parent=None, inter_dtype=F64):
    """H = P = N = G = 1, T = 3: every quantity is a number one can follow by hand."""
    state = torch.tensor([1.0], dtype=F64).view(1, 1, 1, 1)
    x = torch.tensor([1.0, 2.0, -1.0], dtype=F64).view(1, 3, 1, 1)
    dt = torch.tensor([0.5, 1.0, 0.25], dtype=F64).view(1, 3, 1)
    A = torch.tensor([-1.0], dtype=F64)
    B = torch.tensor([2.0, 1.0, 4.0], dtype=F64).view(1, 3, 1, 1)
    C = torch.tensor([1.0, 3.0, 2.0], dtype=F64).view(1, 3, 1, 1)
    inter = torch.full((1, 3, 1, 1, 1), float("nan"), dtype=inter_dtype)
    par = None if parent is None else torch.tensor([parent], dtype=torch.int32)
    return state, x, dt, A, B, C, inter, par


def test_chain_by_hand():
    state, x, dt, A, B, C, inter, _ = _scalar_problem()
    y = mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, intermediate_states=inter)
    h0 = math.exp(-0.5) + 2 * 0.5
    h1 = h0 * math.exp(-1.0) + 1 * 2 * 1.0
    h2 = h1 * math.exp(-0.25) + 4 * (-1 * 0.25)
    assert y.flatten().tolist() == pytest.approx([h0 * 1, h1 * 3, h2 * 2], abs=1e-12)
    assert inter.flatten().tolist() == pytest.approx([h0, h1, h2], abs=1e-12)
    assert state.item() == pytest.approx(h2, abs=1e-12)


def test_three_node_tree_by_hand():
    # node 0 is the root's child; nodes 1 and 2 are both children of node 0
    state, x, dt, A, B, C, inter, par = _scalar_problem(parent=[-1, 0, 0])
    y = mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, intermediate_states=inter,
                                  retrieve_parent_token=par)
    h0 = math.exp(-0.5) + 1.0
    h1 = h0 * math.exp(-1.0) + 2.0
    h2 = h0 * math.exp(-0.25) - 1.0          # restarts from node 0, not from node 1
    assert y.flatten().tolist() == pytest.approx([h0, 3 * h1, 2 * h2], abs=1e-12)
    assert inter.flatten().tolist() == pytest.approx([h0, h1, h2], abs=1e-12)
    assert state.item() == pytest.approx(h2, abs=1e-12)   # the state after step T-1 (node 2)


@pytest.mark.parametrize("bad", [2, 5, -7])
def test_parent_not_before_t_is_ignored(bad):
    # a parent >= t (not computed yet) or garbage keeps the running state: same as the chain
    state, x, dt, A, B, C, inter, par = _scalar_problem(parent=[-1, -1, bad])
    y = mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, intermediate_states=inter,
                                  retrieve_parent_token=par)
    s2, x2, dt2, A2, B2, C2, inter2, _ = _scalar_problem()
    y2 = mamba2_mtp_ssm_update_ref(s2, x2, dt2, A2, B2, C2, intermediate_states=inter2)
    assert torch.equal(y, y2) and torch.equal(inter, inter2)


def test_tree_rereads_the_rounded_node():
    state, x, dt, A, B, C, inter, par = _scalar_problem(parent=[-1, 0, 0],
                                                        inter_dtype=torch.bfloat16)
    mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, intermediate_states=inter,
                              retrieve_parent_token=par)
    h0 = math.exp(-0.5) + 1.0
    h0_stored = torch.tensor(h0, dtype=torch.bfloat16).double().item()
    assert h0_stored != h0
    h2 = h0_stored * math.exp(-0.25) - 1.0
    assert inter[0, 2].double().item() == torch.tensor(h2, dtype=torch.bfloat16).double().item()


def test_D_z_bias_softplus_by_hand():
    # one step, two heads in one group: dt + bias through softplus (below and above 20)
    state = torch.tensor([0.5, -1.0], dtype=F64).view(1, 2, 1, 1)
    x = torch.tensor([[1.5, -2.0]], dtype=F64).view(1, 1, 2, 1)
    dt = torch.tensor([[0.0, 25.0]], dtype=F64).view(1, 1, 2)
    bias = torch.tensor([0.3, 0.0], dtype=F64)
    A = torch.tensor([-0.5, -0.01], dtype=F64)
    B = torch.tensor([2.0], dtype=F64).view(1, 1, 1, 1)
    C = torch.tensor([0.5], dtype=F64).view(1, 1, 1, 1)
    D = torch.tensor([0.25, 2.0], dtype=F64)
    z = torch.tensor([[0.7, -0.3]], dtype=F64).view(1, 1, 2, 1)
    y = mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=bias,
                                  dt_softplus=True)
    expect = []
    for hh, (s0, xv, d, a, dd, zv) in enumerate([(0.5, 1.5, math.log1p(math.exp(0.3)), -0.5,
                                                   0.25, 0.7),
                                                  (-1.0, -2.0, 25.0, -0.01, 2.0, -0.3)]):
        h = s0 * math.exp(a * d) + 2.0 * xv * d
        yy = (h * 0.5 + xv * dd) * zv / (1 + math.exp(-zv))
        expect.append(yy)
        assert state[0, hh].item() == pytest.approx(h, abs=1e-12)
    assert y.flatten().tolist() == pytest.approx(expect, abs=1e-12)


def test_pad_slot_and_indices_by_hand():
    # two sequences: b=0 uses slot 1 and intermediate row 0; b=1 is padded
    state = torch.tensor([7.0, 1.0], dtype=F64).view(2, 1, 1, 1)
    x = torch.tensor([1.0, 3.0], dtype=F64).view(2, 1, 1, 1)
    dt = torch.tensor([0.5, 0.5], dtype=F64).view(2, 1, 1)
    A = torch.tensor([-1.0], dtype=F64)
    B = torch.ones(2, 1, 1, 1, dtype=F64)
    C = torch.ones(2, 1, 1, 1, dtype=F64)
    inter = torch.full((2, 1, 1, 1, 1), -5.0, dtype=F64)
    y = mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, intermediate_states=inter,
                                  state_batch_indices=torch.tensor([1, -1], dtype=torch.int32),
                                  intermediate_state_indices=torch.tensor([0, 1], dtype=torch.int32))
    h = math.exp(-0.5) + 0.5
    assert y.flatten().tolist() == pytest.approx([h, 0.0], abs=1e-12)
    assert state.flatten().tolist() == pytest.approx([7.0, h], abs=1e-12)   # slot 0 untouched
    assert inter.flatten().tolist() == pytest.approx([h, -5.0], abs=1e-12)  # row 1 untouched


def test_disable_state_update_keeps_state():
    state, x, dt, A, B, C, inter, _ = _scalar_problem()
    mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, intermediate_states=inter,
                              disable_state_update=True)
    assert state.item() == 1.0 and not torch.isnan(inter).any()


def test_expanded_forms_match_compact():
    g = torch.Generator().manual_seed(0)
    Bt, T, H, P, N, G = 2, 3, 4, 8, 16, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64) * 0.5  # noqa: E731
    state, x, B, C = r(Bt, H, P, N), r(Bt, T, H, P), r(Bt, T, G, N), r(Bt, T, G, N)
    dt, A, D, bias = r(Bt, T, H), -r(H).abs(), r(H), r(H)
    s1, s2 = state.clone(), state.clone()
    y1 = mamba2_mtp_ssm_update_ref(s1, x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True)
    y2 = mamba2_mtp_ssm_update_ref(s2, x, dt[..., None].expand(Bt, T, H, P),
                                   A[:, None, None].expand(H, P, N), B, C,
                                   D=D[:, None].expand(H, P), dt_bias=bias[:, None].expand(H, P),
                                   dt_softplus=True)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


def test_commit_step_k_by_hand():
    state = torch.arange(3, dtype=F64).view(3, 1, 1, 1) * 100     # slots hold 0, 100, 200
    inter = torch.arange(2 * 4, dtype=F64).view(2, 4, 1, 1, 1)    # row r, step k holds 4r + k
    mamba2_commit_accepted_state_ref(
        state, inter, torch.tensor([2, -1, 3], dtype=torch.int32),
        state_batch_indices=torch.tensor([2, 0, -1], dtype=torch.int32),
        intermediate_state_indices=torch.tensor([1, 0, 0], dtype=torch.int32))
    # b=0: slot 2 <- row 1 step 2 = 6; b=1 accepted nothing; b=2 is padded
    assert state.flatten().tolist() == [0.0, 100.0, 6.0]


def test_commit_default_indices():
    state = torch.zeros(2, 1, 1, 2, dtype=F64)
    inter = torch.arange(2 * 3 * 2, dtype=F64).view(2, 3, 1, 1, 2)
    mamba2_commit_accepted_state_ref(state, inter, torch.tensor([1, 0], dtype=torch.int32))
    assert state.flatten().tolist() == [2.0, 3.0, 6.0, 7.0]
