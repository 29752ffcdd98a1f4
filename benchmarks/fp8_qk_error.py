"""Accuracy of ``allow_fp8_qk`` (Q K^T on e4m3 tensor cores) against the default fp16 path, by
the spread of the logits: an fp8 cache with a large kv_scale (stored values about 2, dequantized
about 2^11) and bf16 query rows scaled by 2^u / kv_scale, so a row's logits have a std of about
2^(u+1). u is one value for every row, or drawn per row from -10..4 (magnitudes 2^14 apart in
one CTA). Each line: relative Frobenius error of the whole output against the float64 reference,
the worst single row's, and how many rows pass 1e-2.

    python benchmarks/fp8_qk_error.py
"""

from __future__ import annotations

import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from jitkern.ops import spec_dec_attention  # noqa: E402
from jitkern.reference.spec_dec_attention import (random_eagle_tree,  # noqa: E402
                                                  random_paged_inputs, spec_dec_attention_ref)

KV_SCALE = 1024.0
SHAPES = ((32, 8, 128), (8, 4, 256))
SPREADS = ((-10, 4), (0, 0), (2, 2), (4, 4))   # u range of the rows' scale 2^u / kv_scale


def inputs(shape, nodes, ulo, uhi, seed):
    hq, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    drafts = [random_eagle_tree(nodes, rng) for _ in range(2)]
    a = random_paged_inputs([700, 2100], drafts, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                            kv_dtype=torch.float8_e4m3fn, generator=g, device="cpu")
    a["kv_scale"] = KV_SCALE
    q = torch.randn(a["q"].shape, generator=g, dtype=torch.float64)
    u = torch.randint(ulo, uhi + 1, q.shape[:2], generator=g).double()
    a["q"] = (q * (2.0 ** u)[..., None] / KV_SCALE).to(torch.bfloat16)
    return {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in a.items()}


def main():
    print(f"# fp8_qk_error on {torch.cuda.get_device_name()}; kv_scale {KV_SCALE:g}, contexts "
          f"700 / 2100, two trees")
    print("| Hq/Hkv/D | nodes | u | logit std | allow_fp8_qk | Frobenius | worst row | "
          "rows > 1e-2 |\n|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for nodes in (16, 64):
            for ulo, uhi in SPREADS:
                a = inputs(shape, nodes, ulo, uhi, 5 + nodes)
                ref = spec_dec_attention_ref(**{k: v for k, v in a.items()
                                                if k not in ("max_q_len", "max_seq_len")})
                for allow in (False, True):
                    out = torch.full_like(a["q"], float("nan"))
                    spec_dec_attention(**a, out=out, allow_fp8_qk=allow)
                    diff = out.double() - ref
                    err = float(diff.norm() / ref.norm())
                    rows = diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
                    print(f"| {'/'.join(map(str, shape))} | {nodes} | {ulo}..{uhi} | "
                          f"{2 * 2.0 ** uhi:.3g} | {allow} | {err:.2e} | {float(rows.max()):.2e} | "
                          f"{int((rows > 1e-2).sum())}/{rows.numel()} |", flush=True)


if __name__ == "__main__":
    main()
