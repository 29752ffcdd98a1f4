"""CPU: the float64 reference of spec_dec_attention and the tree-mask tools on small cases
checked by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch

from jitkern.reference.spec_dec_attention import (chain_parents, pack_bits, pack_tree_masks,
                                                  random_eagle_tree, random_paged_inputs,
                                                  spec_dec_attention_ref, tree_visibility,
                                                  unpack_bits)


def test_pack_bits_lsb_first_and_word_order():
    vis = torch.zeros(2, 40, dtype=torch.bool)
    vis[0, [0, 2, 33]] = True         # word 0: bits 0 and 2 -> 5; word 1: bit 1 -> 2
    vis[1, 31] = True                 # the sign bit of word 0
    m = pack_bits(vis)
    assert m.dtype == torch.int32 and m.shape == (2, 2)
    assert m[0].tolist() == [5, 2]
    assert m[1].tolist() == [-(2 ** 31), 0]
    assert m.view(torch.uint32)[1, 0].item() == 2 ** 31
    assert torch.equal(unpack_bits(m, 40), vis)


def test_tree_visibility_is_ancestors_and_self():
    #      0
    #     / \
    #    1   2
    #    |    \
    #    3     4
    vis = tree_visibility([-1, 0, 0, 1, 2])
    expect = [[1, 0, 0, 0, 0],
              [1, 1, 0, 0, 0],
              [1, 0, 1, 0, 0],
              [1, 1, 0, 1, 0],
              [1, 0, 1, 0, 1]]
    assert vis.int().tolist() == expect
    assert pack_tree_masks([[-1, 0, 0, 1, 2]])[:, 0].tolist() == [1, 3, 5, 11, 21]


def test_tree_visibility_rejects_bad_parents():
    with pytest.raises(ValueError, match="parents\\[0\\] must be -1"):
        tree_visibility([0, 0])
    with pytest.raises(ValueError, match="parent must come before its child"):
        tree_visibility([-1, 2, 0])


def test_random_eagle_tree_is_valid():
    rng = random.Random(0)
    for n in (1, 8, 33, 64):
        p = random_eagle_tree(n, rng)
        assert len(p) == n and p[0] == -1
        assert all(0 <= p[i] < i for i in range(1, n))


def _one_head_case(keys, values, q, ctx_len, mask_bits=None, page_size=16):
    """Sequence 0 with L = len(keys) and a draft of len(q) tokens, one head, D = 64 with the
    given vectors in the first coordinates (rest zeros)."""
    L, n, d = len(keys), len(q), 64
    kc = torch.zeros(1, page_size, 1, d, dtype=torch.float32)
    vc = torch.zeros(1, page_size, 1, d, dtype=torch.float32)
    for i, (k, v) in enumerate(zip(keys, values)):
        kc[0, i, 0, :len(k)] = torch.tensor(k, dtype=torch.float32)
        vc[0, i, 0, :len(v)] = torch.tensor(v, dtype=torch.float32)
    qq = torch.zeros(n, 1, d)
    for t, qv in enumerate(q):
        qq[t, 0, :len(qv)] = torch.tensor(qv)
    assert L - n == ctx_len
    args = dict(q=qq, k_cache=kc, v_cache=vc, block_tables=torch.zeros(1, 1, dtype=torch.int32),
                seq_lens=torch.tensor([L], dtype=torch.int32), scale=1.0)
    if mask_bits is not None:
        args["tree_mask"] = torch.tensor([[b] for b in mask_bits], dtype=torch.int32)
    return spec_dec_attention_ref(**args)


def test_prefix_always_visible_and_draft_bits():
    # L = 4: prefix positions 0, 1; drafts 0, 1 at positions 2, 3.
    keys = [[1.0], [0.0], [2.0], [3.0]]
    values = [[10.0], [20.0], [30.0], [40.0]]
    # row 0 sees prefix + draft 0 (bit 0); row 1 sees prefix + draft 1 only (bit 1, not bit 0)
    out = _one_head_case(keys, values, [[1.0], [1.0]], 2, mask_bits=[0b01, 0b10])
    w0 = [math.exp(1), math.exp(0), math.exp(2)]
    e0 = (10 * w0[0] + 20 * w0[1] + 30 * w0[2]) / sum(w0)
    w1 = [math.exp(1), math.exp(0), math.exp(3)]
    e1 = (10 * w1[0] + 20 * w1[1] + 40 * w1[2]) / sum(w1)
    assert out[0, 0, 0].item() == pytest.approx(e0, rel=1e-12)
    assert out[1, 0, 0].item() == pytest.approx(e1, rel=1e-12)
    assert out[:, :, 1:].abs().max().item() == 0.0


def test_default_is_causal_chain():
    keys = [[1.0], [0.5], [2.0], [3.0]]
    values = [[1.0], [2.0], [3.0], [4.0]]
    chain = _one_head_case(keys, values, [[1.0], [0.3]], 2)
    masked = _one_head_case(keys, values, [[1.0], [0.3]], 2, mask_bits=[0b01, 0b11])
    assert torch.equal(chain, masked)
    # row 0 must not see draft 1 (position 3): its weight on value 4 is zero
    w = [math.exp(1), math.exp(0.5), math.exp(2)]
    assert chain[0, 0, 0].item() == pytest.approx((1 * w[0] + 2 * w[1] + 3 * w[2]) / sum(w), rel=1e-12)


def test_row_whose_only_visible_draft_is_itself():
    # empty prefix: row 1 sees only draft 1, so its output is exactly V[1]
    keys = [[5.0], [-7.0], [1.0]]
    values = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    out = _one_head_case(keys, values, [[1.0], [1.0], [1.0]], 0, mask_bits=[0b001, 0b010, 0b101])
    assert out[1, 0, :2].tolist() == [3.0, 4.0]
    w = [math.exp(5), math.exp(1)]
    assert out[2, 0, 0].item() == pytest.approx((1 * w[0] + 5 * w[1]) / sum(w), rel=1e-12)


def test_row_with_nothing_visible_is_zero_not_nan():
    out = _one_head_case([[1.0], [2.0]], [[1.0], [2.0]], [[1.0], [1.0]], 0, mask_bits=[0b01, 0])
    assert not torch.isnan(out).any()
    assert out[1].abs().max().item() == 0.0


def test_ragged_lengths_match_per_sequence_calls():
    gen = torch.Generator().manual_seed(0)
    trees = [[-1, 0, 0, 1], chain_parents(2), random_eagle_tree(7, random.Random(1))]
    a = random_paged_inputs([5, 0, 37], trees, num_heads=4, num_kv_heads=2, head_dim=64,
                            dtype=torch.float32, page_size=16, device="cpu", generator=gen)
    assert a["q_cu_seqlens"].tolist() == [0, 4, 6, 13]
    full = spec_dec_attention_ref(**a)
    cu = a["q_cu_seqlens"].tolist()
    for b in range(3):
        one = dict(a, q=a["q"][cu[b]:cu[b + 1]], block_tables=a["block_tables"][b:b + 1],
                   seq_lens=a["seq_lens"][b:b + 1], tree_mask=a["tree_mask"][cu[b]:cu[b + 1]])
        one.pop("q_cu_seqlens")
        assert torch.allclose(spec_dec_attention_ref(**one), full[cu[b]:cu[b + 1]], rtol=0, atol=1e-12)


def test_gqa_head_mapping_and_layouts():
    gen = torch.Generator().manual_seed(4)
    a = random_paged_inputs([20, 3], [3, 3], num_heads=6, num_kv_heads=2, head_dim=64,
                            dtype=torch.float32, page_size=16, tree=False, device="cpu", generator=gen)
    out = spec_dec_attention_ref(**a)
    # the same cache in HND gives the same result
    h = dict(a, k_cache=a["k_cache"].transpose(1, 2).contiguous(),
             v_cache=a["v_cache"].transpose(1, 2).contiguous(), kv_layout="HND")
    assert torch.allclose(spec_dec_attention_ref(**h), out, rtol=0, atol=1e-12)
    # query head 4 reads KV head 4 // 3 = 1: swapping KV head 0's data must not change it
    s = dict(a, k_cache=a["k_cache"].clone())
    s["k_cache"][:, :, 0] = 0
    assert torch.equal(spec_dec_attention_ref(**s)[:, 3:], out[:, 3:])
    assert not torch.allclose(spec_dec_attention_ref(**s)[:, :3], out[:, :3])


def test_fp8_reference_dequantizes_with_kv_scale():
    gen = torch.Generator().manual_seed(5)
    a = random_paged_inputs([30], [4], num_heads=4, num_kv_heads=1, head_dim=64,
                            kv_dtype=torch.float8_e4m3fn, kv_scale=0.25, page_size=16,
                            tree=False, device="cpu", generator=gen)
    out = spec_dec_attention_ref(**a)
    deq = dict(a, k_cache=a["k_cache"].float() * 0.25, v_cache=a["v_cache"].float() * 0.25)
    deq.pop("kv_scale")
    assert torch.allclose(spec_dec_attention_ref(**deq), out, rtol=0, atol=1e-12)


def test_sliding_window():
    # L = 5, draft of 2 at positions 3, 4; window 2: row 0 (pos 3) sees 2, 3; row 1 sees 3, 4
    keys = [[9.0], [9.0], [0.0], [1.0], [2.0]]
    values = [[100.0], [100.0], [1.0], [2.0], [3.0]]
    kc = torch.zeros(1, 16, 1, 64)
    vc = torch.zeros(1, 16, 1, 64)
    for i in range(5):
        kc[0, i, 0, 0] = keys[i][0]
        vc[0, i, 0, 0] = values[i][0]
    q = torch.zeros(2, 1, 64)
    q[:, 0, 0] = 1.0
    out = spec_dec_attention_ref(q, kc, vc, torch.zeros(1, 1, dtype=torch.int32),
                                 torch.tensor([5], dtype=torch.int32), scale=1.0, sliding_window=2)
    w = [1.0, math.e]
    assert out[0, 0, 0].item() == pytest.approx((1 * w[0] + 2 * w[1]) / sum(w), rel=1e-12)
    w = [math.e, math.e ** 2]
    assert out[1, 0, 0].item() == pytest.approx((2 * w[0] + 3 * w[1]) / sum(w), rel=1e-12)
