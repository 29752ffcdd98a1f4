"""The examples' checks on a GPU with small sizes (skipped without one): the tree speculative-
decoding step with the jitkern ops, the kernels against the float64 references inside that step,
each example script end to end (a fresh cache: the first run compiles, the second compiles
nothing), a preset-warmed cache serving the tree example with zero compiles, and the transformers
Mamba2 model on jitkern's SSM update."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
tsd = importlib.import_module("tree_spec_decode")
tm = importlib.import_module("transformers_mamba2")
support = importlib.import_module("example_support")

pytestmark = pytest.mark.gpu

RUN = tsd.RunConfig(context_lens=(9, 70, 3, 33), page_size=16, max_nodes=16, accept_prob=0.7,
                    seed=1)
needs_transformers = pytest.mark.skipif(not tm.have_transformers(),
                                        reason="transformers is not installed")


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_tree_step_matches_step_by_step_decoding(state_dtype, seed):
    model = tsd.HybridModel(tsd.ModelConfig(d_model=256, state_dtype=state_dtype), "cuda",
                            seed=seed)
    run = tsd.RunConfig(**{**RUN.__dict__, "seed": seed})
    with torch.inference_mode():
        r = tsd.run_step(model, run, tsd.JitkernOps())
    c = r["check"]
    print(state_dtype, seed, r["trees"], r["paths"], c["errors"], c["greedy_agreement"])
    assert c["passed"], c


def test_tree_step_kernels_match_references_in_place():
    """Inside the example (same model, same caches, same trees): the verify pass and the commit
    with the jitkern ops against the same with the float64 references."""
    model = tsd.HybridModel(tsd.ModelConfig(d_model=256), "cuda", seed=3)
    jk, ref = tsd.JitkernOps(), tsd.ReferenceOps()
    import random

    rng = random.Random(3)
    with torch.inference_mode():
        caches = tsd.Caches(model, 4, 120, 16, seed=3)
        contexts = [[rng.randrange(model.cfg.vocab) for _ in range(n)] for n in RUN.context_lens]
        roots = tsd.prefill(model, caches, contexts, jk)
        greedy = tsd.greedy_continuation(model, caches.clone(), roots, 15, jk)
        trees = [tsd.draft_tree(g, rng, 16, model.cfg.vocab, 0.7) for g in greedy]
        vb = tsd.prepare_verify(caches, trees, "cuda")
        a, b = caches.clone(), caches.clone()
        for t in (a, b):      # poison the verification scratch: unwritten nodes must show
            for inter in t.inter.values():
                inter.fill_(float("nan"))
        la = tsd.verify_forward(model, a, vb, jk)
        lb = tsd.verify_forward(model, b, vb, ref)
        assert support.rel_err(la, lb) < tsd.TOLERANCE["logits"]
        for li in model.mamba_layers():
            for s, tr in enumerate(trees):   # every real node of every sequence was stored
                n = len(tr.parents)
                assert support.rel_err(a.inter[li][s, :n], b.inter[li][s, :n]) < 2e-2
        paths, _ = tsd.accept_paths(trees, lb, vb.cu)
        tsd.commit(model, a, vb, paths, jk)
        tsd.commit(model, b, vb, paths, ref)
        for li in model.mamba_layers():
            sl = a.slots.long()
            assert support.rel_err(a.ssm[li][sl], b.ssm[li][sl]) < 2e-2


def _run_script(name, args, env, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_tree_example_script_compiles_then_reuses(cache_env):
    p = _run_script("tree_spec_decode.py", ["--contexts", "20,70,5", "--d-model", "256"],
                    cache_env)
    print(p.stdout[-4000:], p.stderr[-2000:])
    assert p.returncode == 0
    assert "PASS" in p.stdout and "FAIL" not in p.stdout
    assert "kernels compiled by this run (" in p.stdout          # a fresh cache compiles
    assert "second run, fresh process, same cache: compiles=0" in p.stdout
    assert "time: verify pass" in p.stdout


def test_preset_warmup_serves_the_tree_example_without_compiling(cache_env, tmp_path):
    """The deployment guide's claim: `jitkern warmup --preset nemotron-h-8b`, exported and
    imported elsewhere, serves every kernel of the tree example."""
    build = dict(cache_env, JITKERN_CACHE_DIR=str(tmp_path / "build"))
    bundle = tmp_path / "nemotron-h-8b.jkb"
    for args in (["warmup", "--preset", "nemotron-h-8b", "-q"],
                 ["cache", "export", str(bundle)]):
        p = subprocess.run([sys.executable, "-m", "jitkern.cli", *args], env=build,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "jitkern.cli", "cache", "import", str(bundle)],
                       env=cache_env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    p = _run_script("tree_spec_decode.py", ["--contexts", "20,70,5", "--child"], cache_env)
    out = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and out, p.stdout + p.stderr
    import json

    child = json.loads(out[-1])
    assert child["passed"] and child["counters"]["compiles"] == 0, child


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_mamba2_on_jitkern(dtype):
    res = tm.run("jitkern", "cuda", dtype, batch=3, prompt_len=10, new_tokens=12, timing=True)
    print(res)
    assert res["passed"], res
    assert res["calls"] == res["expected_calls"]
    if dtype == torch.float32:
        assert res["diverged_at"] is None


@needs_transformers
def test_transformers_example_script_compiles_then_reuses(cache_env):
    p = _run_script("transformers_mamba2.py", ["--new-tokens", "8"], cache_env)
    print(p.stdout[-4000:], p.stderr[-2000:])
    assert p.returncode == 0
    assert "PASS" in p.stdout
    assert "second run, fresh process, same cache: compiles=0" in p.stdout
