"""CPU: every argument error of spec_dec_attention names the argument and what was expected
(raised before anything compiles or launches), and every built-in configuration compiles."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from jitkern.ops import spec_dec_attention
from jitkern.reference.spec_dec_attention import pack_tree_masks


def base(**over):
    """Valid CPU arguments: batch 2, drafts of 4 (tree), Hq 8, Hkv 2, D 128, page 16."""
    a = dict(q=torch.randn(8, 8, 128, dtype=torch.bfloat16),
             k_cache=torch.randn(6, 16, 2, 128, dtype=torch.bfloat16),
             v_cache=torch.randn(6, 16, 2, 128, dtype=torch.bfloat16),
             block_tables=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32),
             seq_lens=torch.tensor([40, 20], dtype=torch.int32),
             tree_mask=pack_tree_masks([[-1, 0, 0, 1]] * 2))
    a.update(over)
    return a


def raises(exc, match, **over):
    with pytest.raises(exc, match=match):
        spec_dec_attention(**base(**over))


def test_valid_cpu_arguments_reach_the_device_check():
    raises(ValueError, "q must be on a CUDA device, got cpu")


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor, got list"),
    (dict(q=torch.randn(8, 8, 128)), TypeError, "q must have dtype float16 or bfloat16, got torch.float32"),
    (dict(q=torch.randn(8, 1024, dtype=torch.bfloat16)), ValueError, "q must be 3-D, got shape \\(8, 1024\\)"),
    (dict(q=torch.randn(8, 128, 8, dtype=torch.bfloat16).transpose(1, 2)), ValueError, "q must be contiguous"),
    (dict(q=torch.randn(8, 8, 72, dtype=torch.bfloat16)), ValueError, "q: head_dim 72 is not supported; supported: multiples of 16 from 16 to 256 \\(64, 128 and 256 natively"),
    (dict(q=torch.randn(8, 8, 272, dtype=torch.bfloat16)), ValueError, "q: head_dim 272 is not supported; supported: multiples of 16 from 16 to 256"),
    (dict(q=torch.randn(8, 0, 128, dtype=torch.bfloat16)), ValueError, "q: number of heads must be positive"),
    (dict(kv_layout="NCHW"), ValueError, "kv_layout must be 'NHD' or 'HND', got 'NCHW'"),
    (dict(k_cache=torch.zeros(6, 16, 2, 128, dtype=torch.int8)), TypeError, "k_cache must have dtype float16, bfloat16 or float8_e4m3fn"),
    (dict(v_cache=torch.zeros(6, 16, 256, dtype=torch.bfloat16)), ValueError, "v_cache must be 4-D"),
    (dict(k_cache=torch.randn(6, 16, 2, 128, dtype=torch.bfloat16).transpose(0, 1)), ValueError, "k_cache must be contiguous"),
    (dict(v_cache=torch.zeros(6, 16, 2, 128, dtype=torch.float16)), TypeError, "v_cache dtype torch.float16 must equal k_cache dtype torch.bfloat16"),
    (dict(k_cache=torch.zeros(6, 16, 2, 128, dtype=torch.float16), v_cache=torch.zeros(6, 16, 2, 128, dtype=torch.float16)),
     TypeError, "k_cache dtype torch.float16 must equal q dtype torch.bfloat16 \\(or be float8_e4m3fn\\)"),
    (dict(v_cache=torch.zeros(7, 16, 2, 128, dtype=torch.bfloat16)), ValueError, "v_cache shape \\(7, 16, 2, 128\\) must equal k_cache shape"),
    (dict(k_cache=torch.zeros(6, 16, 2, 64, dtype=torch.bfloat16), v_cache=torch.zeros(6, 16, 2, 64, dtype=torch.bfloat16)),
     ValueError, "k_cache: head_dim 64 .* must equal q's head_dim 128"),
    (dict(k_cache=torch.zeros(6, 8, 2, 128, dtype=torch.bfloat16), v_cache=torch.zeros(6, 8, 2, 128, dtype=torch.bfloat16)),
     ValueError, "k_cache: page_size 8 .* is not supported; supported: \\(16, 32, 64, 128\\)"),
    (dict(k_cache=torch.zeros(6, 16, 3, 128, dtype=torch.bfloat16), v_cache=torch.zeros(6, 16, 3, 128, dtype=torch.bfloat16)),
     ValueError, "q heads 8 must be a multiple of the KV heads 3"),
    (dict(kv_layout="HND"), ValueError, "k_cache: page_size 2 .*\\(HND\\)"),
    (dict(block_tables=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "block_tables must have dtype int32, got torch.int64"),
    (dict(seq_lens=torch.zeros(2, 1, dtype=torch.int32)), ValueError, "seq_lens must be 1-D"),
    (dict(seq_lens=torch.zeros(0, dtype=torch.int32), block_tables=torch.zeros(0, 3, dtype=torch.int32)), ValueError, "seq_lens: the batch must not be empty"),
    (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), ValueError, "block_tables has 3 rows, seq_lens has 2 sequences"),
    (dict(block_tables=torch.zeros(2, 0, dtype=torch.int32)), ValueError, "block_tables: max_pages_per_seq must be positive"),
    (dict(q=torch.randn(7, 8, 128, dtype=torch.bfloat16), tree_mask=None), ValueError, "q: total_q 7 is not a multiple of the batch 2; pass q_cu_seqlens"),
    (dict(max_q_len=3), ValueError, "max_q_len 3 must equal total_q / batch = 4 without q_cu_seqlens"),
    (dict(q_cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int64)), TypeError, "q_cu_seqlens must have dtype int32"),
    (dict(q_cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "q_cu_seqlens must have batch \\+ 1 = 3 entries, got 2"),
    (dict(q_cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32), max_q_len=0), ValueError, "max_q_len must be a positive int, got 0"),
    (dict(tree_mask=torch.zeros(8, 1)), TypeError, "tree_mask must have dtype int32 or uint32, got torch.float32"),
    (dict(tree_mask=torch.zeros(7, 1, dtype=torch.int32)), ValueError, "tree_mask must have total_q = 8 rows, got 7"),
    (dict(tree_mask=torch.zeros(8, 2, dtype=torch.int32)), ValueError, "tree_mask width 2 must be ceil\\(max_q_len / 32\\) = 1 \\(max_q_len 4\\)"),
    (dict(sliding_window=16), ValueError, "sliding_window is supported in chain mode only"),
    (dict(tree_mask=None, sliding_window=0), ValueError, "sliding_window must be a positive int, got 0"),
    (dict(scale=math.nan), ValueError, "scale must be a finite float, got nan"),
    (dict(kv_scale=0.5), ValueError, "kv_scale is the dequantization scale of an fp8 cache; the cache is torch.bfloat16"),
    (dict(out=torch.empty(8, 8, 128, dtype=torch.float16)), TypeError, "out must have dtype torch.bfloat16, got torch.float16"),
    (dict(out=torch.empty(8, 4, 128, dtype=torch.bfloat16)), ValueError, "out shape \\(8, 4, 128\\) must equal q shape \\(8, 8, 128\\)"),
    (dict(max_seq_len=0), ValueError, "max_seq_len must be a positive int, got 0"),
    (dict(num_kv_splits=0), ValueError, "num_kv_splits must be an int in 1..1024, got 0"),
    (dict(workspace=torch.empty(10, dtype=torch.float16)), TypeError, "workspace must have dtype float32"),
    (dict(allow_fp8_qk=1), TypeError, "allow_fp8_qk must be a bool, got 1"),
    (dict(k_cache=torch.empty(6, 16, 2, 128, dtype=torch.bfloat16, device="meta"),
          v_cache=torch.empty(6, 16, 2, 128, dtype=torch.bfloat16, device="meta")),
     ValueError, "k_cache is on meta, q is on cpu: all tensors must be on one device"),
    (dict(out=torch.empty(8, 8, 128, dtype=torch.bfloat16, device="meta")), ValueError, "out is on meta, q is on cpu"),
])
def test_argument_errors(over, exc, match):
    raises(exc, match, **over)


FP8 = dict(k_cache=torch.zeros(6, 16, 2, 128, dtype=torch.float8_e4m3fn),
           v_cache=torch.zeros(6, 16, 2, 128, dtype=torch.float8_e4m3fn))


@pytest.mark.parametrize("ks,exc,match", [
    (torch.ones(2), ValueError, "kv_scale tensor must be one float32 element, got dtype torch.float32 with 2 elements"),
    (torch.ones(1, dtype=torch.float16), ValueError, "kv_scale tensor must be one float32 element"),
    ("1.0", ValueError, "kv_scale must be a finite float or a float32 tensor, got '1.0'"),
    (math.inf, ValueError, "kv_scale must be a finite float"),
])
def test_kv_scale_errors(ks, exc, match):
    raises(exc, match, kv_scale=ks, **FP8)


def test_fp8_cache_with_scale_is_accepted_up_to_the_device():
    raises(ValueError, "q must be on a CUDA device", kv_scale=torch.ones(1), **FP8)


@pytest.mark.parametrize("over,match", [
    (dict(q_cu_seqlens=torch.tensor([1, 4, 8], dtype=torch.int32)), "q_cu_seqlens must start at 0 and end at total_q = 8, got 1 .. 8"),
    (dict(q_cu_seqlens=torch.tensor([0, 5, 4], dtype=torch.int32), q=torch.randn(4, 8, 128, dtype=torch.bfloat16), tree_mask=None, max_q_len=5),
     "q_cu_seqlens must be non-decreasing"),
    (dict(q_cu_seqlens=torch.tensor([0, 6, 8], dtype=torch.int32), max_q_len=4), "a draft of 6 tokens exceeds max_q_len 4"),
    (dict(seq_lens=torch.tensor([40, 3], dtype=torch.int32)), "seq_lens\\[1\\] = 3 is shorter than its 4 draft tokens"),
    (dict(seq_lens=torch.tensor([49, 20], dtype=torch.int32)), "seq_lens max 49 exceeds the page table's capacity / max_seq_len \\(48 tokens\\)"),
    (dict(block_tables=torch.tensor([[0, 1, 2], [3, 6, 5]], dtype=torch.int32)), "block_tables\\[1\\] holds a page outside 0..5"),
    (dict(block_tables=torch.tensor([[0, 1, -1], [3, 4, 5]], dtype=torch.int32)), "block_tables\\[0\\] holds a page outside 0..5"),
])
def test_value_errors_with_check_values(over, match):
    raises(ValueError, match, check_values=True, **over)


def test_unused_page_table_entries_are_not_checked():
    # sequence 1 (20 tokens, page 16) uses two pages: its third entry may hold anything
    raises(ValueError, "q must be on a CUDA device", check_values=True,
           block_tables=torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32))


def test_warmup_configs_compile_for_sm90a():
    """Every built-in (warm-up) configuration compiles with NVRTC for sm_90a (and one for sm_90)."""
    import jitkern
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    cfgs = SPEC_DEC_ATTENTION.warmup_configs()
    assert len(cfgs) >= 8
    shapes = {(c["kv_dtype"], c["page_size"], c["mode"]) for c in cfgs}
    assert {("bf16", 16, "chain"), ("fp8_e4m3", 64, "tree"), ("bf16", 64, "decode")} <= shapes
    for cfg in cfgs:
        e = jitkern.compile(SPEC_DEC_ATTENTION, cfg, arch="sm_90a")
        assert len(e.cubin) > 1000 and set(e.lowered_names) == {"attention", "merge"}
    assert len(jitkern.compile(SPEC_DEC_ATTENTION, cfgs[0], arch="sm_90").cubin) > 1000


def test_custom_op_fake_impl_on_meta_tensors():
    """The registered custom op traces with meta tensors (its fake implementation) and mutates
    only out / workspace."""
    import jitkern.ops  # noqa: F401  (registers the op)

    m = dict(device="meta")
    op = torch.ops.jitkern.spec_dec_attention.default
    args = (torch.empty(8, 8, 128, dtype=torch.bfloat16, **m),
            torch.empty(6, 16, 2, 128, dtype=torch.bfloat16, **m),
            torch.empty(6, 16, 2, 128, dtype=torch.bfloat16, **m),
            torch.empty(2, 3, dtype=torch.int32, **m), torch.empty(2, dtype=torch.int32, **m),
            None, torch.empty(8, 1, dtype=torch.int32, **m), None,
            torch.empty(8, 8, 128, dtype=torch.bfloat16, **m), torch.empty(1, **m),
            0.088, 1.0, "NHD", "tree", 64, 16, 4, 1, 1, 0, 1, 0, 0, False, False)
    assert op(*args) is None
    mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["out", "workspace"]


def _plain_cfg(**over):
    """The family's first warm-up configuration without kv_tma (which only some shapes take),
    with ``over`` applied."""
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    return dict(SPEC_DEC_ATTENTION.warmup_configs()[0], kv_tma=False, **over)


def test_family_rejects_mixed_16bit_types():
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    cfg = _plain_cfg(dtype="fp16", kv_dtype="bf16")
    with pytest.raises(ValueError, match="kv_dtype 'bf16' must equal dtype 'fp16' or be 'fp8_e4m3'"):
        SPEC_DEC_ATTENTION.specialize(cfg)


def test_family_rejects_pipelines_past_shared_memory():
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    cfg = _plain_cfg(head_dim=256, kv_dtype="bf16", q_tile=16, kv_stages=5)
    with pytest.raises(ValueError, match="kv_stages 5 needs 346368 bytes of shared memory per CTA "
                                         "with head_dim 256.*at most 232448"):
        SPEC_DEC_ATTENTION.specialize(cfg)
    SPEC_DEC_ATTENTION.specialize(dict(cfg, kv_stages=3))   # 211 KiB: fits
    # the source's depth (kv_stages 0 -> 2 for 32 KB stages) with 128-position tiles overflows:
    # the message names the resolved depth and the tile
    with pytest.raises(ValueError, match="kv_stages 2 needs 278784 bytes of shared memory per CTA "
                                         "with head_dim 256.*kv_tile 128; at most 232448"):
        SPEC_DEC_ATTENTION.specialize(dict(cfg, kv_stages=0, kv_tile=128))


def test_query_tile_and_split_choices():
    from jitkern.ops.spec_dec_attention import MAX_SPLITS, pick_num_splits, pick_q_tile

    assert [pick_q_tile(r) for r in (4, 16, 17, 32, 64, 65, 512)] == [16, 16, 32, 32, 64, 128, 128]
    kv = 8192 * 8 * 128 * 2 * 2                  # one 8k sequence, 8 KV heads, bf16
    sms, two = 132, 2                            # 132 SMs holding two CTAs each

    def mem(ctas, length, d=128, fp8=False, n=1):   # decode: 16-row tiles, memory bound
        return pick_num_splits(ctas, length, sms, two, ctas * n * 4, d, n * kv, 16, fp8)
    # 16-bit cache: one CTA per SM (8 KV heads x 16 splits = 128 CTAs), never more than that
    assert mem(8, 8192) == 16 and mem(8, 32768) == 16
    assert mem(64, 8192, n=8) == 2 and mem(67, 8192, n=8) == 1
    # one KV head: 132 splits would fill the SMs, and a split keeps ~512 positions (16 splits),
    # but the grid fills at least a quarter of the SMs: 33, trimmed to 32 of 4 tiles each
    assert mem(1, 8192) == 32 and mem(1, 32768) == 64 and mem(2, 8192) == 16
    # ... the same bytes at other head dims (4 tiles at D = 256, 16 at D = 64)
    assert mem(4, 8192, d=256) == 32 and mem(16, 8192, d=64) == 8
    # short contexts still split 8 ways (at least two tiles a split)
    assert mem(8, 1024) == 8
    # fp8 cache: two CTAs per SM while each split reads >= 16 tiles, else one
    assert mem(64, 8192, fp8=True, n=8) == 4 and mem(64, 32768, fp8=True, n=8) == 4
    assert mem(8, 8192, fp8=True) == 16 and mem(8, 32768, fp8=True) == 16
    # 100 tiles: 100 // 8 = 12 splits of 9 tiles (no fewer splits give 9 tiles each)
    assert mem(8, 6400) == 12
    # trees (compute bound): every resident CTA (264 // 8 = 33), but over a long context a split
    # does at least 8 units of 64 positions x 64 rows: 128 tiles x 1 // 8 = 16 splits of 8 tiles
    assert pick_num_splits(8, 8192, sms, two, 8 * 64, 128, kv, 64) == 16
    # ... and at 4k; a 2k context keeps the fill (33 -> 16 by the tile count, 2 tiles each)
    assert pick_num_splits(8, 4096, sms, two, 8 * 64, 128, kv, 64) == 8
    assert pick_num_splits(8, 2048, sms, two, 8 * 64, 128, kv, 64) == 16
    # 128-row tiles count two units a tile: 16 CTAs of a 64-node tree at 8k fill at 16 splits
    assert pick_num_splits(16, 8192, sms, two, 64 * 32, 128, kv, 128) == 16
    # many rows (64-node tree, G = 8, one KV head: 4 row tiles): the partials' traffic (4x the
    # K/V bytes here) does not hold trees back; 264 // 4 = 66 splits, 32 by the split's work
    kv1 = 8192 * 1 * 128 * 2 * 2
    assert pick_num_splits(4, 8192, sms, two, 64 * 8, 128, kv1, 128) == 32
    # ... but a grid left under half the SMs splits to half of them (16-node tree, G = 8, one
    # KV head, two 64-row tiles: 16 splits by the work, 33 -> 32 to fill 66 SMs)
    assert pick_num_splits(2, 8192, sms, two, 16 * 8, 128, kv1, 64) == 32
    # 1k context, batch 1 (16 CTAs): 16 splits -> 8 by the tile count (17 tiles), trimmed to the
    # 6 splits that give the same 3 tiles each
    assert pick_num_splits(16, 1088, sms, two, 64 * 32, 128, kv // 8, 128) == 6
    # batch 8 (128 CTAs) would split in two: not below 32 tiles; at 8k it does
    assert pick_num_splits(128, 1088, sms, two, 8 * 64 * 32, 128, kv, 128) == 1
    assert pick_num_splits(128, 8192 + 64, sms, two, 8 * 64 * 32, 128, 8 * kv, 128) == 2
    # the workspace cap still applies to trees
    assert pick_num_splits(1, 1 << 20, sms, two, 1, 128, 1 << 40, 64) == MAX_SPLITS
    assert pick_num_splits(133, 8192, sms, two, 64 * 32, 128, 64 * kv, 64) == 1
    # 64-row tiles at D >= 128 stop at one CTA per SM (32k, batch 1: 16 splits, not 32) unless
    # each split still reads 64 tiles (32k, batch 8: 64 CTAs x 4 splits of 128 tiles)
    assert pick_num_splits(8, 32768, sms, two, 16 * 32, 128, 4 * kv, 64) == 16
    assert pick_num_splits(64, 32768, sms, two, 8 * 16 * 32, 128, 32 * kv, 64) == 4
    # ... 8k, batch 8: 2 splits; head_dim 64 keeps two CTAs per SM (16 KV heads: 16 splits)
    assert pick_num_splits(64, 8192, sms, two, 8 * 16 * 32, 128, 8 * kv, 64) == 2
    assert pick_num_splits(16, 8192, sms, two, 64 * 16, 64, kv, 64) == 16
    # an fp8 cache keeps two CTAs per SM from 8 tiles a split (32k batch 1: 32 splits of 16)
    kv8 = kv // 2
    assert pick_num_splits(8, 32768, sms, two, 16 * 32, 128, 4 * kv8, 64, fp8=True) == 32
    assert pick_num_splits(64, 8192, sms, two, 8 * 16 * 32, 128, 8 * kv8, 64, fp8=True) == 4
    assert pick_num_splits(32, 1024, sms, two, 64 * 32, 128, kv8 // 8, 64, fp8=True) == 4


def _tiling(rows, bt, hkv, length, fp8=False):   # 132 SMs holding two CTAs each, D = 128
    from jitkern.ops.spec_dec_attention import pick_tiling
    return pick_tiling(rows, bt, hkv, length, bt * hkv * rows, 128, 1 if fp8 else 2, fp8,
                       lambda qt: (132, 2))


def test_small_grids_halve_128_row_tiles(monkeypatch):
    op = importlib.import_module("jitkern.ops.spec_dec_attention")
    # the shape's tile where the work per SM does not choose one (SMALL_GRID_TILES off): a
    # 64-node tree, G = 4, 1k, batch 1: 16 CTAs x 8 splits = 128 < 132 SMs -> 64-row tiles,
    # 32 CTAs, one per SM: 4 splits; batch 8: 128 CTAs unsplit -> 256 in 64-row tiles
    monkeypatch.setattr(op, "SMALL_GRID_TILES", False)
    assert _tiling(256, 1, 8, 1024) == (64, 4)
    assert _tiling(256, 8, 8, 1024) == (64, 1)
    # at 8k the 128-row grid reaches the SMs (16 CTAs x 16 splits): kept
    assert _tiling(256, 1, 8, 8192) == (128, 16)
    # one KV head (8/1/128), 8k, batch 1: 64-node (512 rows) and 16-node (128 rows) trees
    assert _tiling(512, 1, 1, 8192) == (64, 16)
    assert _tiling(128, 1, 1, 8192) == (64, 32)   # 2 CTAs: split to half the SMs
    # tiles up to 64 rows are then never changed
    assert _tiling(64, 1, 8, 1024)[0] == 64 and _tiling(16, 1, 8, 1024)[0] == 16


def test_small_grids_take_small_tiles():
    from jitkern.families.spec_dec_attention import q_tiles_for
    from jitkern.ops.spec_dec_attention import small_tile_splits

    # (the H200's fastest measured tiling of each, BENCHMARKS.md) 32/8/128 16-node trees,
    # batch 1: 1k, about one work unit an SM -> 16-row tiles, 4 splits (8.7 us fp8, 9.2 bf16)
    assert _tiling(64, 1, 8, 1024, fp8=True) == (16, 4)
    assert _tiling(64, 1, 8, 1024) == (16, 4)
    # 4k, 3.9 units: 32-row tiles with an fp8 cache (14.4 us against 18.7 in 64-row ones), the
    # shape's 64-row tile with a 16-bit one; 8k (7.8 units): 64-row tiles either way
    assert _tiling(64, 1, 8, 4096, fp8=True) == (32, 8)
    assert _tiling(64, 1, 8, 4096) == (64, 8)
    assert _tiling(64, 1, 8, 8192, fp8=True) == (64, 16)
    # 128-row tiles only from HALF_TILE_WORK: 64-node trees at 2k batch 1 (15.5 us against
    # 21.4), 64/8/128 16-node trees at 1k batch 8 (20.7 against 28.3); 8k keeps them
    assert _tiling(256, 1, 8, 2048) == (64, 4)
    assert _tiling(128, 8, 8, 1024) == (64, 1)
    assert _tiling(256, 1, 8, 8192) == (128, 16)
    # one KV head, 8k, batch 1: 16-node trees (128 rows) and 4-chains (32 rows) of 8/1/128
    assert _tiling(128, 1, 1, 8192) == (16, 16)
    assert _tiling(32, 1, 1, 8192) == (16, 32)
    # decode and short chains already run 16-row tiles
    assert _tiling(8, 1, 8, 8192) == (16, 16)
    # splits: 32 CTAs over 16 tiles -> 4 (128 CTAs, 4 tiles each); 2 CTAs over 128 tiles -> 32;
    # 32-row tiles stay at one CTA per SM: 16 CTAs over 64 tiles -> 8
    assert small_tile_splits(16, 32, 16, 132, 2, 512, 128) == 4
    assert small_tile_splits(16, 2, 128, 132, 2, 32, 128) == 32
    assert small_tile_splits(32, 16, 64, 132, 2, 512, 128) == 8
    # never under MIN_TILES_PER_SPLIT tiles a split, whatever the grid
    assert small_tile_splits(16, 1, 16, 132, 2, 8, 128) == 8
    # every tile the op may pick is in the warm-up sets: the shape's, its halves, 32 for fp8
    assert q_tiles_for(256) == (128, 64, 16) and q_tiles_for(64) == (64, 16)
    assert q_tiles_for(256, fp8=True) == (128, 64, 32, 16) and q_tiles_for(16) == (16,)
    assert q_tiles_for(32, fp8=True) == (32, 16)


def test_small_grids_of_64_row_16_bit_tiles_run_three_stages():
    from jitkern.families.spec_dec_attention import (SPEC_DEC_ATTENTION, shared_bytes,
                                                     op_configs, small_grid_stages, stages)

    # 16-node tree, G = 4, on 132 SMs: 8k batch 1 (8 heads x 16 splits), 1k batch 8 (8 x 8,
    # unsplit), 8k batch 8 (8 x 8 x 4 splits: two CTAs per SM of a split grid)
    assert small_grid_stages("bf16", 128, 64, 128, 16, 132) == 3
    assert small_grid_stages("bf16", 128, 64, 64, 1, 132) == 3
    assert small_grid_stages("fp16", 112, 64, 256, 4, 132) == 3     # padded to 128
    # two CTAs per SM unsplit (64-node tree, 1k batch 8: 8 x 8 x 4 row tiles), more than two
    # (batch 64), other tiles, head dims and an fp8 cache: the default
    assert small_grid_stages("bf16", 128, 64, 256, 1, 132) == 0
    assert small_grid_stages("bf16", 128, 64, 265, 4, 132) == 0
    assert small_grid_stages("bf16", 128, 128, 16, 4, 132) == 0
    assert small_grid_stages("bf16", 128, 32, 16, 4, 132) == 0
    assert small_grid_stages("bf16", 64, 64, 16, 4, 132) == 0
    assert small_grid_stages("bf16", 256, 64, 16, 4, 132) == 0
    assert small_grid_stages("fp8_e4m3", 128, 64, 16, 4, 132) == 0
    cfg = dict(head_dim=128, dtype="bf16", kv_dtype="bf16", kv_layout="NHD", page_size=64,
               mode="tree", q_tile=64, split_kv=True)
    deep = dict(cfg, kv_stages=3)
    # (beside the tensor-map form of large grids; small grids copy with cp.async)
    assert op_configs(cfg) == [cfg, dict(cfg, kv_tma=True), deep]
    assert stages(cfg) == 2 and stages(deep) == 3 and shared_bytes(deep) <= 227 * 1024
    big = dict(cfg, q_tile=128)
    assert op_configs(big) == [dict(big, kv_tma=True)]
    # the warm-up set holds the deep variant beside each 64-row 16-bit tree tile
    warm = SPEC_DEC_ATTENTION.warmup_configs()
    assert sum(1 for c in warm if c.get("kv_stages") == 3) == 2
    assert all(dict(c, kv_stages=0) in [dict(w, kv_stages=0) for w in warm if w != c]
               for c in warm if c.get("kv_stages") == 3)


def test_resident_ctas_follow_shared_memory_and_launch_bounds():
    from jitkern.families.spec_dec_attention import resident_ctas, shared_bytes

    sm90 = 228 * 1024
    decode = dict(head_dim=128, q_tile=16, kv_dtype="bf16")
    assert shared_bytes(decode) == 16 * 272 + 3 * 2 * 64 * 272
    assert resident_ctas(decode, sm90) == 2
    assert resident_ctas(dict(decode, kv_dtype="fp8_e4m3"), sm90) == 2
    assert resident_ctas(dict(decode, head_dim=256), sm90) == 1      # 512-byte rows: 140 KiB
    assert resident_ctas(dict(decode, q_tile=64), sm90) == 2         # 8 warps, 2 CTAs bound
    assert resident_ctas(dict(decode, kv_stages=2), sm90) == 3      # 74 KiB, <= 170 registers
    assert resident_ctas(dict(decode, kv_stages=4), sm90) == 1
    assert resident_ctas(dict(decode, q_tile=32, kv_stages=2), sm90) == 2   # 4 warps, 255 regs
    assert resident_ctas(decode, 100 * 1024) == 1                    # never below one


def test_kv_tile_sizes_the_pipeline():
    from jitkern.families.spec_dec_attention import kv_tile, resident_ctas, shared_bytes, stages

    fp8 = dict(head_dim=128, q_tile=16, kv_dtype="fp8_e4m3")
    assert kv_tile(fp8) == 64 and stages(fp8) == 5                 # the source's choice
    # 128 positions of fp8 hold the bytes of 64 16-bit ones: 3 stages, 2 CTAs per SM
    big = dict(fp8, kv_tile=128)
    assert kv_tile(big) == 128 and stages(big) == 3
    assert shared_bytes(big) == 16 * 272 + 3 * 2 * 128 * 144
    assert resident_ctas(big, 228 * 1024) == 2
    assert stages(dict(big, head_dim=64)) == 5 and stages(dict(big, head_dim=256)) == 2
    assert stages(dict(big, kv_dtype="bf16")) == 2                  # 32 KB stages


def test_tree_tiles_take_two_stages_but_head_dim_64_takes_three():
    from jitkern.families.spec_dec_attention import resident_ctas, shared_bytes, stages

    tree = dict(head_dim=128, q_tile=64, kv_dtype="bf16")
    assert stages(tree) == 2 and stages(dict(tree, kv_dtype="fp8_e4m3")) == 2
    assert stages(dict(tree, q_tile=128)) == 2
    d64 = dict(tree, head_dim=64)                     # 8 KB stages of 16-bit K: memory-bound
    assert stages(d64) == 3 and stages(dict(d64, head_dim=48)) == 3   # padded to 64
    assert stages(dict(d64, kv_dtype="fp8_e4m3")) == 2 and stages(dict(d64, q_tile=128)) == 2
    # Q rows, three stages of K and V (64 rows of 144 bytes), the swizzle alignment slack
    assert shared_bytes(d64) == 64 * 144 + 3 * 2 * 64 * 144 + 1024
    assert resident_ctas(d64, 228 * 1024) == 2


@pytest.mark.parametrize("head_dim,padded", [(16, 64), (48, 64), (80, 128), (96, 128),
                                             (112, 128), (144, 256), (192, 256), (240, 256)])
def test_padded_head_dims_compile_and_size_like_their_padded_kernel(head_dim, padded):
    """Head dims other than 64/128/256 run the kernel of the next of those sizes (spec: 'any
    multiple of 16 up to 256 is padded'): same shared memory and occupancy, their own binary."""
    import jitkern
    from jitkern.families.spec_dec_attention import (SPEC_DEC_ATTENTION, padded_head_dim,
                                                     resident_ctas, shared_bytes)

    assert padded_head_dim(head_dim) == padded
    for kv, mode, qt in (("bf16", "tree", 64), ("fp8_e4m3", "decode", 16),
                         ("fp8_e4m3", "tree", 128)):
        cfg = _plain_cfg(head_dim=head_dim, kv_dtype=kv, mode=mode, q_tile=qt)
        native = dict(cfg, head_dim=padded)
        assert shared_bytes(cfg) == shared_bytes(native)
        assert resident_ctas(cfg, 228 * 1024) == resident_ctas(native, 228 * 1024)
        e = jitkern.compile(SPEC_DEC_ATTENTION, cfg, arch="sm_90a")
        assert len(e.cubin) > 1000 and e.key != jitkern.compile(SPEC_DEC_ATTENTION, native,
                                                                  arch="sm_90a").key


def test_family_rejects_head_dims_off_the_grid():
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    for d in (8, 72, 272):
        with pytest.raises(ValueError, match=f"head_dim.*{d}.*multiples of 16 from 16 to 256"):
            SPEC_DEC_ATTENTION.specialize(_plain_cfg(head_dim=d))


def test_plan_key_covers_what_validation_checks():
    """The per-signature plan key changes with everything ``prepare`` decides from, and is None
    for arguments without metadata (those take the full checks)."""
    mod = importlib.import_module("jitkern.ops.spec_dec_attention")
    q = torch.randn(8, 8, 128, dtype=torch.bfloat16)
    k = torch.zeros(6, 16, 2, 128, dtype=torch.bfloat16)
    bt = torch.zeros(2, 3, dtype=torch.int32)
    sl = torch.zeros(2, dtype=torch.int32)
    base = dict(q=q, k_cache=k, v_cache=k, block_tables=bt, seq_lens=sl, q_cu_seqlens=None,
                tree_mask=None, scale=None, kv_scale=None, kv_layout="NHD", sliding_window=None,
                out=None, max_q_len=None, max_seq_len=None, num_kv_splits=None, workspace=None,
                allow_fp8_qk=False)
    key = mod._call_key(**base)
    assert key == mod._call_key(**dict(base, q=torch.randn(8, 8, 128, dtype=torch.bfloat16)))
    variants = [dict(q=q.half()), dict(q=q.transpose(0, 1).contiguous().transpose(0, 1)),
                dict(scale=0.1), dict(scale=1), dict(scale=1.0), dict(kv_layout="HND"),
                dict(sliding_window=4), dict(max_seq_len=48), dict(num_kv_splits=2),
                dict(kv_scale=0.5), dict(kv_scale=torch.ones(1)), dict(out=torch.empty_like(q)),
                dict(block_tables=torch.zeros(2, 4, dtype=torch.int32)),
                dict(seq_lens=torch.zeros(2, dtype=torch.int64)), dict(allow_fp8_qk=True)]
    keys = [mod._call_key(**dict(base, **v)) for v in variants]
    assert key not in keys and len(set(keys)) == len(keys)
    assert mod._call_key(**dict(base, q=[1.0])) is None


def test_fp8_qk_is_set_only_where_the_kernel_has_that_path():
    """allow_fp8_qk becomes the fp8_qk configuration only for an fp8 cache with a bf16 query on a
    64-row tile with a padded head_dim of 128 or 256; every other call keeps the configuration
    (and the cached kernel) it has without the flag."""
    from jitkern.families.spec_dec_attention import fp8_qk_applies
    from jitkern.ops.spec_dec_attention import kernel_config

    assert fp8_qk_applies("bf16", "fp8_e4m3", 128, 64)
    assert fp8_qk_applies("bf16", "fp8_e4m3", 256, 64)
    assert not fp8_qk_applies("bf16", "fp8_e4m3", 128, 128)  # measured no faster
    assert fp8_qk_applies("bf16", "fp8_e4m3", 80, 64)        # padded to 128
    assert not fp8_qk_applies("fp16", "fp8_e4m3", 128, 64)   # 11-bit queries: no exact split
    assert not fp8_qk_applies("bf16", "bf16", 128, 64)
    assert not fp8_qk_applies("bf16", "fp8_e4m3", 128, 32)   # mma.sync tiles
    assert not fp8_qk_applies("bf16", "fp8_e4m3", 64, 64)    # 64-byte e4m3 rows
    base = kernel_config(torch.bfloat16, torch.float8_e4m3fn, 128, "NHD", "tree", 64, 64)
    assert "fp8_qk" not in dict(base)
    on = dict(kernel_config(torch.bfloat16, torch.float8_e4m3fn, 128, "NHD", "tree", 64, 64,
                            fp8_qk=True))
    assert on == dict(dict(base), fp8_qk=True)


@pytest.mark.parametrize("q_tile,head_dim", [(64, 128), (64, 256), (64, 96), (128, 128)])
def test_fp8_qk_configurations_compile_for_sm90a(q_tile, head_dim):
    """The e4m3 Q K^T kernels compile with NVRTC for sm_90a (no GPU needed) into a different
    binary than the default configuration's, with the same entries."""
    import jitkern
    from jitkern.families.spec_dec_attention import SPEC_DEC_ATTENTION

    cfg = dict(head_dim=head_dim, dtype="bf16", kv_dtype="fp8_e4m3", kv_layout="NHD",
               page_size=64, mode="tree", q_tile=q_tile, split_kv=True)
    on = jitkern.compile(SPEC_DEC_ATTENTION, dict(cfg, fp8_qk=True), arch="sm_90a")
    off = jitkern.compile(SPEC_DEC_ATTENTION, cfg, arch="sm_90a")
    assert set(on.lowered_names) == {"attention", "merge"}
    assert on.cubin != off.cubin


def test_kv_tma_configurations():
    """kv_tma (tensor-map K/V loads) exists for 16-bit caches and head dims that are multiples
    of 64 and for fp8 caches and head dims that are multiples of 128, in 16/32-row tiles and the
    warpgroup tiles (64/128 rows over 64-position KV tiles); it compiles there (bulk tensor
    copies in the SASS is a GPU matter), is refused elsewhere by name, and the warm-up set
    carries it (beside the cp.async form where the op takes tensor maps on large grids only:
    16-bit 64-row tiles, fp8 16- to 64-row tiles)."""
    import jitkern
    from jitkern.families.spec_dec_attention import (SPEC_DEC_ATTENTION, op_configs,
                                                     resident_ctas, shared_bytes, tma_box_rows,
                                                     tma_grids, tma_shape)
    from jitkern.ops.spec_dec_attention import use_tma

    base = dict(head_dim=128, dtype="bf16", kv_dtype="bf16", kv_layout="NHD", page_size=64,
                mode="decode", q_tile=16, split_kv=True)
    for bad, what in ((dict(kv_dtype="fp8_e4m3", head_dim=64), "kv_dtype 'fp8_e4m3', head_dim 64.*q_tile 16"),
                      (dict(kv_dtype="fp8_e4m3", q_tile=64, mode="tree", head_dim=64),
                       "kv_dtype 'fp8_e4m3', head_dim 64"),
                      (dict(q_tile=64, mode="tree", kv_tile=128), "q_tile 64, kv_tile 128"),
                      (dict(head_dim=80), "head_dim 80")):
        with pytest.raises(ValueError, match=f"kv_tma applies to 16-bit caches.*fp8 caches.*"
                                             f"multiple of 128.*{what}"):
            SPEC_DEC_ATTENTION.specialize(dict(base, kv_tma=True, **bad))
    for d, layout, ps, mode, qt, kv in ((64, "NHD", 64, "decode", 16, "bf16"),
                                        (128, "HND", 16, "chain", 32, "bf16"),
                                        (256, "NHD", 128, "chain", 16, "bf16"),
                                        (64, "HND", 16, "tree", 64, "bf16"),
                                        (128, "NHD", 128, "tree", 128, "bf16"),
                                        (128, "HND", 32, "tree", 64, "fp8_e4m3"),
                                        (128, "NHD", 16, "decode", 16, "fp8_e4m3"),
                                        (256, "HND", 64, "chain", 32, "fp8_e4m3"),
                                        (256, "NHD", 64, "tree", 128, "fp8_e4m3")):
        cfg = dict(base, head_dim=d, kv_layout=layout, page_size=ps, mode=mode, q_tile=qt,
                   kv_dtype=kv, kv_tma=True)
        # sized for either layout (below sm_90 the source keeps the cp.async one), so the
        # occupancy is the cp.async kernel's
        assert shared_bytes(cfg) >= shared_bytes(dict(cfg, kv_tma=False))
        assert resident_ctas(cfg, 228 * 1024) == resident_ctas(dict(cfg, kv_tma=False), 228 * 1024)
        e = jitkern.compile(SPEC_DEC_ATTENTION, cfg, arch="sm_90a")
        assert e.key != jitkern.compile(SPEC_DEC_ATTENTION, dict(cfg, kv_tma=False),
                                        arch="sm_90a").key
    assert op_configs(base) == [dict(base, kv_tma=True)]
    assert not tma_shape(dict(base, head_dim=96))
    # boxes: a page, or what one pipeline copies of a larger page (a 64-row tile's warpgroups
    # copy half a tile each)
    assert [tma_box_rows(dict(base, q_tile=qt, page_size=ps))
            for qt, ps in ((16, 16), (16, 128), (64, 16), (64, 64), (64, 128),
                           (128, 128))] == [16, 64, 16, 32, 32, 64]
    assert tma_box_rows(dict(base, q_tile=32, page_size=128, kv_tile=128)) == 128
    # the op's choice, on 132 SMs: a grid of at most one CTA per SM (128 CTAs in 16 splits), a
    # split grid of two per SM (small, but crowded) and an unsplit grid of 512 CTAs (large)
    one, two, big = (128, 16, 132), (256, 4, 132), (512, 1, 132)
    # 16-bit: every tile but 64-row ones always, those unless the grid is small
    for qt, grid, want in ((16, one, True), (32, big, True), (64, one, False), (64, two, False),
                           (64, big, True), (128, one, True), (128, big, True)):
        assert use_tma("bf16", 128, qt, (9, 0), *grid) == want
    assert not use_tma("bf16", 128, 16, (8, 9), *big)
    # fp8: 16/32-row tiles on grids of more CTAs than SMs, 64-row tiles on large grids, 128-row
    # tiles never
    for qt, grid, want in ((16, one, False), (16, two, True), (16, big, True), (32, one, False),
                           (32, two, True), (64, one, False), (64, two, False), (64, big, True),
                           (128, two, False), (128, big, False)):
        assert use_tma("fp8_e4m3", 128, qt, (9, 0), *grid) == want
    assert not use_tma("fp8_e4m3", 64, 64, (9, 0), *big)   # head_dim 64: no whole boxes
    assert not use_tma("fp8_e4m3", 64, 16, (9, 0), *big)
    # pages of 16 (boxes of 16 rows): 16/32-row tiles on large grids only, never with fp8; the
    # warpgroup tiles as at page 64; pages of 32 as 64
    for kv, qt, grid, want in (("bf16", 16, one, False), ("bf16", 16, two, False),
                               ("bf16", 16, big, True), ("bf16", 32, big, True),
                               ("bf16", 64, two, False), ("bf16", 64, big, True),
                               ("bf16", 128, one, True), ("bf16", 128, big, True),
                               ("fp8_e4m3", 16, two, False), ("fp8_e4m3", 16, big, False),
                               ("fp8_e4m3", 32, big, False), ("fp8_e4m3", 64, big, True),
                               ("fp8_e4m3", 128, big, False)):
        assert use_tma(kv, 128, qt, (9, 0), *grid, page_size=16) == want, (kv, qt, grid)
        assert (use_tma(kv, 128, qt, (9, 0), *grid, page_size=32)
                == use_tma(kv, 128, qt, (9, 0), *grid)), (kv, qt, grid)
    assert op_configs(dict(base, page_size=16)) == [dict(base, page_size=16),
                                                   dict(base, page_size=16, kv_tma=True)]
    assert op_configs(dict(base, page_size=16, kv_dtype="fp8_e4m3")) == [
        dict(base, page_size=16, kv_dtype="fp8_e4m3")]
    fp8_decode = dict(base, kv_dtype="fp8_e4m3")
    assert op_configs(fp8_decode) == [fp8_decode, dict(fp8_decode, kv_tma=True)]
    fp8_tree = dict(base, kv_dtype="fp8_e4m3", mode="tree", q_tile=64)
    assert op_configs(fp8_tree) == [fp8_tree, dict(fp8_tree, kv_tma=True)]
    assert op_configs(dict(fp8_tree, q_tile=128)) == [dict(fp8_tree, q_tile=128)]
    warm = SPEC_DEC_ATTENTION.warmup_configs()
    for c in warm:
        if c.get("kv_tma"):
            assert tma_shape(c)
        elif tma_shape(c):   # a cp.async form for small grids, with its tensor-map form
            grids = tma_grids(c)
            assert grids == "none" or (grids in ("large", "crowded") and (
                dict(c, kv_tma=True) in warm or c.get("kv_stages") == 3)), c
    # decode, 4-chains (16 and 32 rows) and the trees' small-grid tiles (16 rows; 32 with fp8):
    # bf16 at pages 16 and 64, fp8 at page 64 (fp8 16/32-row tiles at page 16 take none); the
    # trees' warpgroup tiles
    assert sum(1 for c in warm if c.get("kv_tma") and c["q_tile"] <= 32) == 4 * 2 + 5
    assert sum(1 for c in warm if c.get("kv_tma") and c["q_tile"] >= 64) > 0


def test_tensor_maps_refuse_caches_they_cannot_describe():
    """paged_kv_map names what it cannot describe before asking the driver: a cache of wider
    than 16-bit elements, one that does not start 16-byte aligned, and one with more positions
    (NHD) or page heads (HND) than int32 coordinates reach (the op keeps cp.async copies for
    those)."""
    from jitkern.ops.tensor_map import fits_tensor_map, paged_kv_map

    # (the op asks fits_tensor_map before choosing kv_tma)
    assert fits_tensor_map((2**25 - 1, 64, 1, 64)) and not fits_tensor_map((2**25, 64, 1, 64))
    assert not fits_tensor_map((2**27, 16, 64, 64))
    with pytest.raises(ValueError, match="16-bit or one-byte caches only, got torch.float32"):
        paged_kv_map(torch.zeros(2, 64, 1, 64, dtype=torch.float32), "NHD", 64)
    flat = torch.zeros(2 * 64 * 64 + 8, dtype=torch.bfloat16)
    off = next(i for i in range(1, 8) if (flat.data_ptr() + 2 * i) % 16)
    with pytest.raises(ValueError, match="is not 16-byte aligned"):
        paged_kv_map(flat[off:off + 2 * 64 * 64].view(2, 64, 1, 64), "NHD", 64)
    row = torch.zeros(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="2147483648 positions exceeds the int32 coordinates"):
        paged_kv_map(row.as_strided((2**25, 64, 1, 64), (0, 0, 0, 1)), "NHD", 64)
    with pytest.raises(ValueError, match="2147483648 page heads exceeds the int32 coordinates"):
        paged_kv_map(row.as_strided((2**27, 16, 64, 64), (0, 0, 0, 1)), "HND", 64)
