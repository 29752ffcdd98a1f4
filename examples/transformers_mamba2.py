"""A transformers Mamba2 model decoding with jitkern's SSM state update.

A tiny Mamba2 with random weights (the configuration is built in code: nothing is downloaded)
generates greedily twice:

1. with its own implementation (transformers' per-token ``selective_state_update``: mamba_ssm's
   kernel when installed, else its PyTorch fallback);
2. with that function replaced by ``jitkern.ops.mamba2_mtp_ssm_update`` (T = 1): transformers
   passes ``dt`` ``[B, H, P]``, ``A`` ``[H, P, N]`` and ``D``/``dt_bias`` ``[H, P]`` as stride-0
   expanded views, which the op takes as they are.

The check: the same tokens and logits within tolerance at every step. Prefill (the chunked scan)
and the causal conv1d stay transformers'; only the per-token SSM update changes. ``main()`` also
times one update call both ways and reports the kernels jitkern compiled.

Without a CUDA GPU, ``--backend reference`` (the default there) patches in jitkern's float64
reference instead of the kernel: the patching is exercised, nothing is compiled.

Run:  python examples/transformers_mamba2.py          (exit 1: check failed; 0 with a message
                                                        when transformers is not installed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

try:
    import jitkern  # noqa: F401
except ImportError:   # running from a checkout without `pip install .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from example_support import (CompileRecorder, jit_counters, median_seconds, print_compile_report,
                             rel_err, rerun_in_fresh_process)
from jitkern.reference.mamba2 import mamba2_mtp_ssm_update_ref

MISSING = ("transformers is not installed: this example needs it (pip install transformers); "
           "skipping.")


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        from transformers.models.mamba2 import modeling_mamba2  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(device="cpu", dtype=torch.float32, *, vocab: int = 1024, hidden: int = 256,
                layers: int = 4, head_dim: int = 64, state_size: int = 128, groups: int = 2,
                seed: int = 0):
    """A random ``Mamba2ForCausalLM``: ``hidden * 2 / head_dim`` heads of ``head_dim``, d_state
    ``state_size``, ``groups`` B/C groups, conv kernel 4 (its ``init_weights``, seeded)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    heads = 2 * hidden // head_dim
    cfg = Mamba2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_heads=heads, head_dim=head_dim, expand=2, state_size=state_size,
                       n_groups=groups, conv_kernel=4, chunk_size=64, tie_word_embeddings=False,
                       eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return Mamba2ForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def generate(model, input_ids: torch.Tensor, new_tokens: int):
    """Greedy generation with the model's own loop and cache. Returns (tokens ``[B, new]``,
    float32 logits ``[new, B, vocab]``)."""
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits).float()


# ------------------------------------------------------------------------ the replacement

def jitkern_selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                                   dt_softplus=False, z=None, **_):
    """transformers' ``selective_state_update`` contract on jitkern's op: state ``[B, H, P, N]``
    updated in place; x, z ``[B, H, P]``; dt ``[B, H, P]`` (stride 0 over P); A ``[H, P, N]``;
    B, C ``[B, G, N]``; D, dt_bias ``[H, P]``. Returns y ``[B, H, P]`` in x's dtype."""
    from jitkern.ops import mamba2_mtp_ssm_update

    return mamba2_mtp_ssm_update(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                 dt_softplus=dt_softplus)


def reference_selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                                     dt_softplus=False, z=None, **_):
    """The same contract on jitkern's float64 reference (any device)."""
    y = mamba2_mtp_ssm_update_ref(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                  dt_softplus=dt_softplus)
    return y.to(hidden_states.dtype)


@contextlib.contextmanager
def patched_ssm_update(fn):
    """Route transformers' Mamba2 per-token SSM update through ``fn`` while inside; yields a dict
    whose ``"calls"`` counts the calls (0 after generation means the patch did not take)."""
    from transformers.models.mamba2 import modeling_mamba2 as mm

    seen = {"calls": 0, "last_args": None}

    def counted(*args, **kwargs):
        seen["calls"] += 1
        seen["last_args"] = (args, kwargs)
        return fn(*args, **kwargs)

    original = mm.mamba2_selective_state_update
    mm.mamba2_selective_state_update = counted   # Mamba2Mixer.forward looks the name up per call
    try:
        yield seen
    finally:
        mm.mamba2_selective_state_update = original


def original_ssm_update():
    from transformers.models.mamba2 import modeling_mamba2 as mm

    return mm.mamba2_selective_state_update


# --------------------------------------------------------------------------------- the check

def compare_generations(ref_tokens, ref_logits, new_tokens, new_logits, tol: float) -> dict:
    """Same greedy tokens, and every step's logits within ``tol`` (max |diff| / max |logit|).

    Where the tokens first differ, the run still passes if that step's logits match and the
    original's top two logits there are within ``tol`` of each other (a tie at this precision);
    later steps are not compared (their prefixes differ)."""
    steps = ref_tokens.shape[1]
    errs, diverged, tie = [], None, None
    for i in range(steps):
        errs.append(rel_err(new_logits[i], ref_logits[i]))
        if not torch.equal(new_tokens[:, i], ref_tokens[:, i]):
            diverged = i
            bad = (new_tokens[:, i] != ref_tokens[:, i]).nonzero().flatten().tolist()
            top2 = ref_logits[i][bad].topk(2, dim=-1).values
            scale = float(ref_logits[i].abs().max())
            tie = float((top2[:, 0] - top2[:, 1]).max()) / scale
            break
    err = max(errs)
    ok = err <= tol and (diverged is None or tie <= tol)
    return {"passed": ok, "logits_rel_err": err, "tolerance": tol, "steps_compared": len(errs),
            "steps": steps, "diverged_at": diverged, "tie_gap": tie}


def run(backend: str, device, dtype, batch: int = 3, prompt_len: int = 12, new_tokens: int = 16,
        timing: bool = False, seed: int = 0, **model_kw) -> dict:
    """Build the model, generate with transformers' update then with ``backend``'s, compare."""
    fn = jitkern_selective_state_update if backend == "jitkern" else \
        reference_selective_state_update
    model = build_model(device, dtype, seed=seed, **model_kw)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    with torch.inference_mode():
        ref_tokens, ref_logits = generate(model, ids, new_tokens)
        with patched_ssm_update(fn) as seen:
            new_tokens_, new_logits = generate(model, ids, new_tokens)
    # bf16: transformers' own update rounds dt and dB to bf16, the kernel keeps fp32; measured
    # ~2e-2 on the logits after 4 layers (a wrong update: 0.1 to 1)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    res = compare_generations(ref_tokens, ref_logits, new_tokens_, new_logits, tol)
    res["calls"] = seen["calls"]
    res["expected_calls"] = (new_tokens - 1) * model.config.num_hidden_layers
    if seen["calls"] != res["expected_calls"]:
        res["passed"] = False      # the replacement was not (or not always) used
    res["tokens"] = new_tokens_.tolist()
    if timing and seen["last_args"] is not None:
        res["time_per_call"] = time_one_update(seen["last_args"], fn)
    return res


def time_one_update(call, fn) -> dict:
    """Median seconds of one per-token update (the last call's arguments, on copies) through
    transformers' own function and through ``fn``."""
    args, kwargs = call
    state = args[0]
    saved = state.clone()
    restore = (lambda: state.copy_(saved))
    own = original_ssm_update()
    with torch.inference_mode():
        t_own = median_seconds(lambda: own(*args, **kwargs), setup=restore, reps=50)
        t_new = median_seconds(lambda: fn(*args, **kwargs), setup=restore, reps=50)
    return {"transformers_s": t_own, "jitkern_s": t_new}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("auto", "jitkern", "reference"), default="auto",
                   help="jitkern op (CUDA) or its float64 reference; auto: jitkern on a GPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model dtype (the SSM state cache is float32 either way)")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rerun", action="store_true", help="skip the second, cached run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if not have_transformers():
        print(MISSING)
        return 0
    backend = a.backend
    if backend == "auto":
        backend = "jitkern" if torch.cuda.is_available() else "reference"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    import transformers

    with CompileRecorder() as rec:
        res = run(backend, device, dtype, batch=a.batch, prompt_len=a.prompt_len,
                  new_tokens=a.new_tokens, timing=backend == "jitkern" and not a.child,
                  seed=a.seed)
    counters = jit_counters()
    if a.child:
        print(json.dumps({"passed": res["passed"], "counters": counters, "tokens": res["tokens"]}))
        return 0 if res["passed"] else 1

    print(f"transformers {transformers.__version__} Mamba2ForCausalLM, random weights, {a.dtype}, "
          f"on {device}; batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} greedy tokens")
    what = ("jitkern.ops.mamba2_mtp_ssm_update" if backend == "jitkern" else
            "the float64 reference (no CUDA GPU or --backend reference)")
    print(f"per-token SSM update replaced by: {what}; called {res['calls']} times (expected "
          f"{res['expected_calls']})")
    if res["diverged_at"] is None:
        print(f"tokens: identical for all {res['steps']} steps")
    else:
        print(f"tokens: first differ at step {res['diverged_at']}, where the original's top two "
              f"logits are {res['tie_gap']:.1e} apart (relative): a tie at this precision")
    print(f"logits: max rel err {res['logits_rel_err']:.2e} over {res['steps_compared']} steps "
          f"(tolerance {res['tolerance']:.0e}) -> {'PASS' if res['passed'] else 'FAIL'}")
    if "time_per_call" in res:
        t = res["time_per_call"]
        print(f"one update call: transformers' own {t['transformers_s'] * 1e6:.1f} us, jitkern "
              f"{t['jitkern_s'] * 1e6:.1f} us ({t['transformers_s'] / t['jitkern_s']:.1f}x)")
    if backend == "jitkern":
        print_compile_report(rec, counters)
    ok = res["passed"]
    if backend == "jitkern" and not a.no_rerun:
        child = rerun_in_fresh_process(os.path.abspath(__file__), argv)
        c = child["counters"]
        print(f"second run, fresh process, same cache: compiles={c['compiles']} "
              f"disk_hits={c['disk_hits']} (aot {c['aot_hits']}); check "
              f"{'PASS' if child['passed'] else 'FAIL'}; same tokens: "
              f"{child['tokens'] == res['tokens']}")
        ok = ok and child["passed"] and c["compiles"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
