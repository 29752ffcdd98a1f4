"""CPU tests of the examples: tree construction, mask packing, path acceptance, KV compaction, the
whole verification step with the float64 references standing in for the ops (and the real ops'
validation run on every call), faults the examples' checks must catch, and the transformers
patching (skipped where transformers is not installed)."""

from __future__ import annotations

import importlib
import logging
import random
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
tsd = importlib.import_module("tree_spec_decode")
support = importlib.import_module("example_support")

from jitkern.ops.signature import PlanCache  # noqa: E402
from jitkern.reference.spec_dec_attention import tree_visibility, unpack_bits  # noqa: E402

SMALL = tsd.ModelConfig(vocab=256, d_model=128, layers="MAMA", ssm_heads=4, d_state=32,
                        q_heads=4, kv_heads=2, head_dim=64)


def small_model(**kw):
    return tsd.HybridModel(tsd.ModelConfig(**{**SMALL.__dict__, **kw}), "cpu", seed=1)


class ValidatedReferenceOps(tsd.ReferenceOps):
    """The references compute; before each call the real jitkern op validates the same arguments
    and must get as far as its device check (CPU tensors), i.e. accept every shape, stride and
    dtype the example passes on a GPU."""

    def __init__(self):
        self.real = tsd.JitkernOps()
        self.validated = {"ssm_update": 0, "commit": 0, "attention": 0}

    def _expect_device_error(self, name, fn, *args, **kw):
        with pytest.raises(ValueError, match="CUDA"):
            fn(*args, **kw)
        self.validated[name] += 1

    def ssm_update(self, state, x, dt, A, B, C, D, dt_bias, **kw):
        self._expect_device_error("ssm_update", self.real.ssm_update, state, x, dt, A, B, C, D,
                                  dt_bias, **kw)
        return super().ssm_update(state, x, dt, A, B, C, D, dt_bias, **kw)

    def commit(self, state, inter, accepted, **kw):
        self._expect_device_error("commit", self.real.commit, state, inter, accepted, **kw)
        super().commit(state, inter, accepted, **kw)

    def attention(self, q, k_cache, v_cache, block_tables, seq_lens, **kw):
        self._expect_device_error("attention", self.real.attention, q, k_cache, v_cache,
                                  block_tables, seq_lens, **kw)
        return super().attention(q, k_cache, v_cache, block_tables, seq_lens, **kw)


# ----------------------------------------------------------------------------- draft trees

@pytest.mark.parametrize("seed", range(20))
def test_draft_tree_is_valid_eagle_tree(seed):
    rng = random.Random(seed)
    greedy = [rng.randrange(100) for _ in range(16)]
    t = tsd.draft_tree(greedy, rng, max_nodes=16, vocab=100, accept_prob=0.7)
    n = len(t.parents)
    assert 3 <= n <= 16 and len(t.tokens) == n
    assert t.parents[0] == -1 and t.tokens[0] == greedy[0]
    assert all(0 <= t.parents[i] < i for i in range(1, n))
    for node in range(n):                     # siblings carry distinct tokens
        toks = [t.tokens[c] for c in t.children(node)]
        assert len(toks) == len(set(toks))
    tree_visibility(t.parents)                # raises on an invalid parent array


def test_draft_tree_holds_greedy_path_when_drafter_is_always_right():
    rng = random.Random(3)
    greedy = list(range(50, 66))
    for _ in range(10):
        t = tsd.draft_tree(greedy, rng, max_nodes=16, vocab=1000, accept_prob=1.0)
        # the first child of every greedy node is the next greedy token, down to the deepest
        # expanded level
        node, depth = 0, 0
        while t.children(node):
            node = t.children(node)[0]
            depth += 1
            assert t.tokens[node] == greedy[depth]
        assert depth == t.depth()


def test_prepare_verify_describes_trees_to_both_ops():
    model = small_model()
    caches = tsd.Caches(model, 3, 80, page_size=16, seed=2)
    caches.seq_lens = [5, 40, 17]
    trees = [tsd.DraftTree([-1, 0, 0, 1, 1, 2], [1, 2, 3, 4, 5, 6]),
             tsd.DraftTree([-1], [9]),
             tsd.DraftTree([-1, 0, 1, 2], [7, 8, 9, 10])]
    vb = tsd.prepare_verify(caches, trees, "cpu")
    assert vb.T == 6 and vb.cu == [0, 6, 7, 11]
    assert vb.q_cu_seqlens.tolist() == [0, 6, 7, 11]
    assert vb.seq_lens.tolist() == [11, 41, 21]
    assert vb.tokens.tolist() == [1, 2, 3, 4, 5, 6, 9, 7, 8, 9, 10]
    # K/V slots: context + node index; RoPE positions: context + depth
    assert vb.kv_pos.tolist() == [5, 6, 7, 8, 9, 10, 40, 17, 18, 19, 20]
    assert vb.rope_pos.tolist() == [5, 6, 6, 7, 7, 7, 40, 17, 18, 19, 20]
    assert vb.padded_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 12, 13, 14, 15]
    assert vb.parents.tolist() == [[-1, 0, 0, 1, 1, 2], [-1] * 6, [-1, 0, 1, 2, -1, -1]]
    # the packed mask: node t sees j iff j is t or an ancestor (computed independently here)
    for (lo, hi), t in zip(((0, 6), (6, 7), (7, 11)), trees):
        n = hi - lo
        want = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                want[i, j] = True
                j = t.parents[j]
        assert torch.equal(unpack_bits(vb.tree_mask[lo:hi], n), want)
    # pages reserved for context + draft
    assert [len(p) for p in caches.pages] == [1, 3, 2]
    # conv windows (K = 4): conv_src rows are 3 state rows per sequence (0..8), then the 11 nodes
    # (9..19); a node sees its 3 nearest ancestors, continued into its sequence's state rows
    idx = vb.conv_index.tolist()
    assert idx[0] == [0, 1, 2, 9]            # seq 0 root: its state, itself
    assert idx[3] == [2, 9, 10, 12]          # seq 0 node 3 (0 -> 1 -> 3)
    assert idx[5] == [2, 9, 11, 14]          # seq 0 node 5 (0 -> 2 -> 5), not node 4 or 3
    assert idx[6] == [3, 4, 5, 15]           # seq 1 root
    assert idx[10] == [16, 17, 18, 19]       # seq 2 node 3 of the chain 0 -> 1 -> 2 -> 3


def test_accept_paths_follows_greedy_choices():
    #        0
    #      / | \
    #     1  2  3        tokens: 1->10, 2->11, 3->12
    #    /\   \
    #   4  5   6         tokens: 4->20, 5->21, 6->22
    tree = tsd.DraftTree([-1, 0, 0, 0, 1, 1, 2], [99, 10, 11, 12, 20, 21, 22])
    V = 30

    def logits_for(best):   # best[node] = the argmax token after node
        lg = torch.randn(len(best), V)
        for i, tok in enumerate(best):
            lg[i, tok] = 100.0
        return lg

    # root wants 11 (node 2), node 2 wants 22 (node 6), node 6 wants 5 (the bonus)
    paths, bonus = tsd.accept_paths([tree], logits_for([11, 0, 22, 0, 0, 0, 5]), [0, 7])
    assert paths == [[0, 2, 6]] and bonus == [5]
    # root wants 10 -> node 1, node 1 wants 21 -> node 5 (not the first child)
    paths, bonus = tsd.accept_paths([tree], logits_for([10, 21, 0, 0, 0, 7, 0]), [0, 7])
    assert paths == [[0, 1, 5]] and bonus == [7]
    # root wants a token no child has: only the root is accepted
    paths, bonus = tsd.accept_paths([tree], logits_for([13, 0, 0, 0, 0, 0, 0]), [0, 7])
    assert paths == [[0]] and bonus == [13]


def test_kv_moves_never_overwrite_a_pending_source():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 16)
        path = sorted(rng.sample(range(1, 16), n - 1)) if n > 1 else []
        path = [0] + path
        moves = tsd.kv_moves([7], [path])
        assert all(dst < src for _, src, dst in moves)
        pending = {src for _, src, _ in moves}
        for _, src, dst in moves:
            pending.discard(src)
            assert dst not in pending


def test_commit_compacts_kv_and_releases_pages():
    model = small_model(layers="MA")
    ops = tsd.ReferenceOps()
    caches = tsd.Caches(model, 2, 64, page_size=16, seed=5)
    caches.seq_lens = [14, 30]
    trees = [tsd.DraftTree([-1, 0, 0, 2, 2, 4, 0, 0], list(range(8))),
             tsd.DraftTree([-1, 0, 1], [1, 2, 3])]
    vb = tsd.prepare_verify(caches, trees, "cpu")
    assert [len(p) for p in caches.pages] == [2, 3]
    li = model.attention_layers()[0]
    # code every position's K/V by (sequence, position) (integers < 256: exact in bf16)
    for b in range(2):
        pos = torch.arange(int(vb.seq_lens[b]))
        page, off = caches.physical(torch.full_like(pos, b), pos)
        val = (128 * b + pos).to(model.dtype)[:, None, None]
        caches.k[li][page, off] = val.expand(-1, model.cfg.kv_heads, model.cfg.head_dim)
        caches.v[li][page, off] = -val.expand(-1, model.cfg.kv_heads, model.cfg.head_dim)
    inter0 = caches.inter[model.mamba_layers()[0]]
    inter0.copy_(torch.randn_like(inter0))
    src0 = caches.conv_src[model.mamba_layers()[0]]
    src0.copy_(torch.randn_like(src0))
    paths = [[0, 2, 4, 5], [0]]
    moved = tsd.commit(model, caches, vb, paths, ops)
    assert moved["kv_moves"] == 3
    assert caches.seq_lens == [18, 31]
    # sequence 0: context 0..13 then nodes 0, 2, 4, 5 (stored at 14, 16, 18, 19)
    want0 = list(range(14)) + [14, 16, 18, 19]
    got0 = caches.gather(caches.k[li], 0, 18)[:, 0, 0].float().tolist()
    assert got0 == [float(x) for x in want0]
    got0v = caches.gather(caches.v[li], 0, 18)[:, 0, 0].float().tolist()
    assert got0v == [-float(x) for x in want0]
    got1 = caches.gather(caches.k[li], 1, 31)[:, 0, 0].float().tolist()
    assert got1 == [float(128 + x) for x in range(31)]
    # 18 tokens need 2 pages of 16, 31 need 2: sequence 1's third page went back to the pool
    assert [len(p) for p in caches.pages] == [2, 2] and moved["pages_freed"] == 1
    assert caches.block_tables[1].tolist()[2:] == [-1] * (caches.max_pages - 2)
    used = [p for ps in caches.pages for p in ps]
    assert len(set(used)) == len(used) and not set(used) & set(caches.free_pages)
    # the SSM state of each slot is its last accepted node's intermediate state; its conv state
    # the last 3 conv inputs along the path: sequence 0 (root 0 at row 6 = 2 sequences x 3
    # state rows): nodes 2, 4, 5; sequence 1 (only its root, at row 6 + 8): state rows 4, 5, root
    ml = model.mamba_layers()[0]
    for b, p in enumerate(paths):
        assert torch.equal(caches.ssm[ml][int(caches.slots[b])], inter0[b, p[-1]])
    assert torch.equal(caches.conv[ml][int(caches.slots[0])], src0[[6 + 2, 6 + 4, 6 + 5]])
    assert torch.equal(caches.conv[ml][int(caches.slots[1])], src0[[4, 5, 6 + 8]])


# ------------------------------------------------------------------- the whole step (CPU)

RUN = tsd.RunConfig(context_lens=(9, 3, 21), page_size=16, max_nodes=12, accept_prob=0.6, seed=4)


def test_verification_step_matches_step_by_step_decoding():
    ops = ValidatedReferenceOps()
    with torch.inference_mode():
        r = tsd.run_step(small_model(), RUN, ops)
    c = r["check"]
    assert c["passed"], c
    assert c["lengths_equal"]
    assert all(v <= 1e-6 for v in c["errors"].values()), c["errors"]
    # the run exercised what it claims: ragged trees, some drafts accepted, KV moved
    assert len(set(r["trees"])) > 1
    assert sum(len(p) - 1 for p in r["paths"]) > 0
    assert r["kv_moves"] > 0
    # every op call's arguments passed the real op's validation
    assert ops.validated["ssm_update"] > 0 and ops.validated["attention"] > 0
    assert ops.validated["commit"] == 2


@pytest.mark.parametrize("state_dtype", ["bfloat16"])
def test_verification_step_bf16_state(state_dtype):
    with torch.inference_mode():
        r = tsd.run_step(small_model(state_dtype=state_dtype), RUN, ValidatedReferenceOps())
    assert r["check"]["passed"], r["check"]


def _pipeline(model, ops, run=RUN):
    """run_step's stages, returned so that a test can break one of them."""
    rng = random.Random(run.seed)
    caches = tsd.Caches(model, len(run.context_lens), max(run.context_lens) + run.max_nodes,
                        run.page_size, seed=run.seed)
    contexts = [[rng.randrange(model.cfg.vocab) for _ in range(n)] for n in run.context_lens]
    roots = tsd.prefill(model, caches, contexts, ops)
    greedy = tsd.greedy_continuation(model, caches.clone(), roots, run.max_nodes - 1, ops)
    trees = [tsd.draft_tree(g, rng, run.max_nodes, model.cfg.vocab, run.accept_prob)
             for g in greedy]
    vb = tsd.prepare_verify(caches, trees, model.device)
    before = caches.clone()
    return caches, before, trees, vb


def _check(model, ops, caches, before, trees, vb, logits, paths, bonus):
    return tsd.check_against_step_by_step(model, before, caches, trees, paths, bonus, logits,
                                          vb, ops)


def _verify_commit_check(model, ops, verify_ops):
    """One verify pass with ``verify_ops``, accept, commit with ``ops``, check against
    step-by-step decoding; some accepted node must be out of place (so the commit moves K/V)."""
    with torch.inference_mode():
        caches, before, trees, vb = _pipeline(model, ops)
        logits = tsd.verify_forward(model, caches, vb, verify_ops)
        paths, bonus = tsd.accept_paths(trees, logits, vb.cu)
        assert any(p != list(range(len(p))) for p in paths)
        tsd.commit(model, caches, vb, paths, ops)
        return _check(model, ops, caches, before, trees, vb, logits, paths, bonus)


def test_check_catches_wrong_committed_state():
    model, ops = small_model(), tsd.ReferenceOps()
    with torch.inference_mode():
        caches, before, trees, vb = _pipeline(model, ops)
        logits = tsd.verify_forward(model, caches, vb, ops)
        paths, bonus = tsd.accept_paths(trees, logits, vb.cu)
        tsd.commit(model, caches, vb, paths, ops)
        b = max(range(len(paths)), key=lambda i: len(paths[i]))
        assert len(paths[b]) > 1
        ml = model.mamba_layers()[-1]
        # the parent's state instead of the last accepted node's (an off-by-one commit)
        caches.ssm[ml][int(caches.slots[b])] = caches.inter[ml][b, paths[b][-2]]
        c = _check(model, ops, caches, before, trees, vb, logits, paths, bonus)
    assert not c["passed"] and c["errors"]["ssm_state"] > tsd.TOLERANCE["ssm_state"]


def test_check_catches_missing_kv_compaction(monkeypatch):
    model, ops = small_model(), tsd.ReferenceOps()
    monkeypatch.setattr(tsd, "kv_moves", lambda ctx, paths: [])
    c = _verify_commit_check(model, ops, ops)
    assert not c["passed"] and c["errors"]["kv"] > tsd.TOLERANCE["kv"]


def test_check_catches_attention_ignoring_the_tree_mask():
    model, ops = small_model(), tsd.ReferenceOps()

    class ChainOps(tsd.ReferenceOps):      # a causal chain instead of the tree
        def attention(self, *a, tree_mask=None, **kw):
            return super().attention(*a, **kw)

    c = _verify_commit_check(model, ops, ChainOps())
    assert not c["passed"] and c["errors"]["logits"] > tsd.TOLERANCE["logits"]


def test_check_catches_ssm_ignoring_the_tree():
    model, ops = small_model(), tsd.ReferenceOps()

    class NoTreeOps(tsd.ReferenceOps):     # every node continues from the previous one
        def ssm_update(self, *a, retrieve_parent_token=None, **kw):
            return super().ssm_update(*a, **kw)

    c = _verify_commit_check(model, ops, NoTreeOps())
    assert not c["passed"]


def test_check_catches_conv_windows_ignoring_the_tree(monkeypatch):
    model, ops = small_model(), tsd.ReferenceOps()
    with torch.inference_mode():
        caches, before, trees, vb = _pipeline(model, ops)
        with monkeypatch.context() as m:   # windows in node order, as if every draft were a chain
            m.setattr(tsd.DraftTree, "path_to", lambda self, node: list(range(node + 1)))
            wrong = tsd.prepare_verify(before.clone(), trees, "cpu")
        assert not torch.equal(wrong.conv_index, vb.conv_index)
        logits = tsd.verify_forward(model, caches, wrong, ops)
        paths, bonus = tsd.accept_paths(trees, logits, vb.cu)
        tsd.commit(model, caches, vb, paths, ops)
        c = _check(model, ops, caches, before, trees, vb, logits, paths, bonus)
    assert not c["passed"] and c["errors"]["logits"] > tsd.TOLERANCE["logits"]


def test_check_catches_a_conv_state_left_uncommitted():
    model, ops = small_model(), tsd.ReferenceOps()
    with torch.inference_mode():
        caches, before, trees, vb = _pipeline(model, ops)
        logits = tsd.verify_forward(model, caches, vb, ops)
        paths, bonus = tsd.accept_paths(trees, logits, vb.cu)
        tsd.commit(model, caches, vb, paths, ops)
        for li in model.mamba_layers():
            caches.conv[li].copy_(before.conv[li])
        c = _check(model, ops, caches, before, trees, vb, logits, paths, bonus)
    assert not c["passed"] and c["errors"]["conv_state"] > tsd.TOLERANCE["conv_state"]


def test_nan_never_passes():
    a = torch.ones(3)
    b = torch.tensor([1.0, float("nan"), 1.0])
    assert support.rel_err(a, b) == float("inf") and support.rel_err(b, a) == float("inf")
    assert support.rel_err(a, a) == 0.0


def test_run_step_rejects_too_large_trees():
    with pytest.raises(ValueError, match=r"max_nodes must be in \[2, 16\], got 17"):
        tsd.run_step(small_model(), tsd.RunConfig(max_nodes=17), tsd.ReferenceOps())


def test_model_config_checks_groups():
    with pytest.raises(ValueError, match="ssm_groups must divide ssm_heads"):
        small_model(ssm_groups=3)
    with pytest.raises(ValueError, match="conv_kernel must be at least 2, got 1"):
        small_model(conv_kernel=1)


def test_main_on_cpu_runs_and_reports(capsys):
    rc = tsd.main(["--backend", "reference", "--contexts", "4,11", "--d-model", "128",
                   "--max-nodes", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "float64 references stand in" in out


class _Planned(Exception):
    """Raised instead of loading a kernel: carries the configuration the op chose."""


def _fake_cuda(t):
    """A fake CUDA tensor with t's metadata (no GPU needed: only shapes, strides and dtypes)."""
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


class ConfigRecordingOps(tsd.ReferenceOps):
    """The references compute; each call's arguments are replayed as fake CUDA tensors through the
    real ops up to the point where they ask for their kernel, and that configuration is kept."""

    def __init__(self, monkeypatch):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode()
        self.configs = set()
        self.m2 = importlib.import_module("jitkern.ops.mamba2")
        self.sda = importlib.import_module("jitkern.ops.spec_dec_attention")

        def planned(family, cfg, device):
            raise _Planned(family.name, cfg)

        monkeypatch.setattr(self.m2, "get_kernel", planned)
        # no prepared launch from an earlier real call in this process may short-cut the planning
        monkeypatch.setattr(self.m2, "_plans", PlanCache())
        monkeypatch.setattr(self.m2, "_commit_plans", PlanCache())
        # the SM count the update's layout compares its grid with: an H100 / H200's
        monkeypatch.setattr(self.m2, "sm_count", lambda device: 132)
        monkeypatch.setattr(self.sda, "sm_count", lambda device: 132)
        monkeypatch.setattr(self.sda, "capability", lambda device: (9, 0))
        # scratch buffers come from per-device caches that query the device: fake ones here
        monkeypatch.setattr(self.sda, "_empty_ws",
                            lambda index: torch.empty(1, device=torch.device("cuda", index)))

    def _plan(self, fn, *args, **kw):
        with self.mode:
            args = [_fake_cuda(a) for a in args]
            kw = {k: _fake_cuda(v) for k, v in kw.items()}
            try:
                fn(*args, **kw)
            except _Planned as p:
                self.configs.add((p.args[0], tuple(sorted(p.args[1].items()))))
                return
        raise AssertionError(f"{fn.__name__} did not ask for a kernel")

    def ssm_update(self, state, x, dt, A, B, C, D, dt_bias, **kw):
        self._plan(self.m2.mamba2_mtp_ssm_update, state, x, dt, A, B, C, D=D, dt_bias=dt_bias,
                   dt_softplus=True, out=x, **kw)
        return super().ssm_update(state, x, dt, A, B, C, D, dt_bias, **kw)

    def commit(self, state, inter, accepted, **kw):
        self._plan(self.m2.mamba2_commit_accepted_state, state, inter, accepted, **kw)
        super().commit(state, inter, accepted, **kw)

    def attention(self, q, k_cache, v_cache, block_tables, seq_lens, **kw):
        with self.mode:   # the op's own "which configuration would this call run"
            cfg = self.sda.planned_config(*[_fake_cuda(t) for t in (q, k_cache, v_cache,
                                                                    block_tables, seq_lens)],
                                          num_kv_splits=1,
                                          **{k: _fake_cuda(v) for k, v in kw.items()})
        self.configs.add(("spec_dec_attention", tuple(sorted(cfg.items()))))
        return super().attention(q, k_cache, v_cache, block_tables, seq_lens, **kw)


def test_example_kernels_are_in_the_nemotron_h_preset(monkeypatch):
    """The deployment guide says `jitkern warmup --preset nemotron-h-8b` covers the tree example:
    every configuration the example's op calls choose (recorded from the real ops' planning on
    fake CUDA tensors, with the example's default model shapes) is in the preset's set."""
    from jitkern.presets import get_preset

    ops = ConfigRecordingOps(monkeypatch)
    model = tsd.HybridModel(tsd.ModelConfig(vocab=256, d_model=128), "cpu", seed=1)
    run = tsd.RunConfig(context_lens=(3, 18), max_nodes=16, accept_prob=0.8, seed=2)
    with torch.inference_mode():
        r = tsd.run_step(model, run, ops)
    assert r["check"]["passed"]
    families = {f for f, _ in ops.configs}
    assert families == {"mamba2_mtp_ssm_update", "spec_dec_attention"}
    have = {(f, tuple(sorted(c.items()))) for f, c in get_preset("nemotron-h-8b").configs()}
    missing = [dict(c) for f, c in sorted(ops.configs - have)]
    assert not missing, f"not warmed by the preset: {missing}"


# ---------------------------------------------------------------------- shared helpers

def test_compile_recorder_collects_compile_lines_and_restores_the_level():
    log = logging.getLogger("jitkern")
    before = log.level
    with support.CompileRecorder() as rec:
        log.info("jitkern: compiled %s for %s in %.2f s", "fam/N=128", "sm_90a", 0.25)
        log.info("jitkern: something else %s", 1)
    log.info("jitkern: compiled %s for %s in %.2f s", "after/x", "sm_90a", 1.0)
    assert rec.compiled == [("fam/N=128", "sm_90a", 0.25)]
    assert log.level == before


# ---------------------------------------------------------------------------- transformers

tm = importlib.import_module("transformers_mamba2")
needs_transformers = pytest.mark.skipif(not tm.have_transformers(),
                                        reason="transformers is not installed")

TINY = dict(vocab=128, hidden=128, layers=2, head_dim=64, state_size=32, groups=2)


@needs_transformers
def test_transformers_patch_with_reference_gives_same_generation():
    res = tm.run("reference", "cpu", torch.float32, batch=2, prompt_len=6, new_tokens=6, **TINY)
    assert res["passed"], res
    assert res["calls"] == res["expected_calls"] == 5 * 2
    assert res["diverged_at"] is None and res["logits_rel_err"] < 1e-4


@needs_transformers
def test_transformers_patch_is_undone():
    from transformers.models.mamba2 import modeling_mamba2 as mm

    before = mm.mamba2_selective_state_update
    with tm.patched_ssm_update(tm.reference_selective_state_update):
        assert mm.mamba2_selective_state_update is not before
    assert mm.mamba2_selective_state_update is before


@needs_transformers
def test_transformers_check_catches_a_wrong_update(monkeypatch):
    right = tm.reference_selective_state_update

    def no_skip(state, hidden_states, dt, A, B, C, D=None, **kw):   # drops the D term
        return right(state, hidden_states, dt, A, B, C, **kw)

    monkeypatch.setattr(tm, "reference_selective_state_update", no_skip)
    res = tm.run("reference", "cpu", torch.float32, batch=2, prompt_len=6, new_tokens=6, **TINY)
    assert not res["passed"] and res["logits_rel_err"] > 1e-3


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_jitkern_wrapper_passes_op_validation(dtype):
    """transformers' argument forms (stride-0 dt/A/D/dt_bias views, B/C views) are accepted by
    the real op: on CPU it gets as far as the device check."""
    model = tm.build_model("cpu", dtype, **TINY)
    ids = torch.randint(0, 128, (2, 5))
    errors = []

    def try_op(*args, **kwargs):
        with pytest.raises(ValueError, match="CUDA") as e:
            tm.jitkern_selective_state_update(*[a.clone() if i == 0 else a
                                                for i, a in enumerate(args)], **kwargs)
        errors.append(str(e.value))
        return tm.reference_selective_state_update(*args, **kwargs)

    with torch.inference_mode(), tm.patched_ssm_update(try_op) as seen:
        tm.generate(model, ids, 3)
    assert seen["calls"] == 2 * 2 and all("state must be a CUDA tensor" in m for m in errors)


def test_compare_generations_rules():
    V = 10
    tok = torch.tensor([[1, 2, 3]])
    lg = torch.randn(3, 1, V) * 0.1
    for i, t in enumerate(tok[0]):
        lg[i, 0, t] = 5.0
    same = tm.compare_generations(tok, lg, tok.clone(), lg.clone(), 1e-3)
    assert same["passed"] and same["diverged_at"] is None
    # a different token where the top two are far apart: fail
    other = tok.clone()
    other[0, 1] = 7
    bad = tm.compare_generations(tok, lg, other, lg.clone(), 1e-3)
    assert not bad["passed"] and bad["diverged_at"] == 1
    # a different token at an exact tie: pass, later steps not compared
    tied = lg.clone()
    tied[1, 0, 7] = 5.0
    ok = tm.compare_generations(tok, tied, other, tied.clone(), 1e-3)
    assert ok["passed"] and ok["steps_compared"] == 2
    # NaN logits fail
    nan = lg.clone()
    nan[0, 0, 0] = float("nan")
    assert not tm.compare_generations(tok, lg, tok, nan, 1e-3)["passed"]


def test_transformers_example_skips_cleanly_without_transformers(monkeypatch, capsys):
    monkeypatch.setattr(tm, "have_transformers", lambda: False)
    assert tm.main([]) == 0
    assert "transformers is not installed" in capsys.readouterr().out
