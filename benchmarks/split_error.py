"""Accuracy of the split-KV path: relative Frobenius error against the float64 reference of the
same call unsplit and forced into several KV splits (fp32 partials: splitting should add no
error of its own). One line per row and split count.

    python benchmarks/split_error.py
"""

from __future__ import annotations

import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from spec_dec_attention import build, chain_parents, random_eagle_tree  # noqa: E402

from jitkern.ops import spec_dec_attention  # noqa: E402
from jitkern.reference.spec_dec_attention import spec_dec_attention_ref  # noqa: E402

ROWS = (  # (Hq, Hkv, D), draft nodes, context, batch, KV dtype, input dtype
    ((32, 8, 128), 1, 8192, 1, torch.bfloat16, torch.bfloat16),
    ((32, 8, 128), 4, 8192, 1, torch.bfloat16, torch.bfloat16),
    ((32, 8, 128), 16, 8192, 1, torch.bfloat16, torch.bfloat16),
    ((32, 8, 128), 64, 1024, 1, torch.bfloat16, torch.bfloat16),
    ((32, 8, 128), 64, 8192, 1, torch.float8_e4m3fn, torch.bfloat16),
    ((16, 16, 64), 64, 8192, 1, torch.bfloat16, torch.bfloat16),
    ((32, 8, 128), 16, 8192, 1, torch.float16, torch.float16),
)


def main():
    print(f"# split_error on {torch.cuda.get_device_name()}")
    print("| Hq/Hkv/D | q | ctx | KV | splits | rel. error vs float64 |\n|---|---|---|---|---|---|")
    rng = random.Random(0)
    for (hq, hkv, d), n, ctx, batch, kv, dt in ROWS:
        draft = chain_parents(n) if n <= 4 else random_eagle_tree(n, rng)
        a = build(batch, hq, hkv, d, ctx - n, draft, torch.float8_e4m3fn
                  if kv == torch.float8_e4m3fn else torch.bfloat16)
        if dt == torch.float16:
            a = dict(a, q=a["q"].half(), k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half())
        ref = spec_dec_attention_ref(**a)
        for splits in (1, 4, 16, 64):
            out = spec_dec_attention(**a, num_kv_splits=splits)
            err = float((out.double() - ref).norm() / ref.norm())
            print(f"| {hq}/{hkv}/{d} | {n} | {ctx // 1024}k | {str(kv).split('.')[-1]} | "
                  f"{splits} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
