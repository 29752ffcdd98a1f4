"""Run one benchmark row's kernel a few times, for a profiler (Nsight Compute) to pick up.

    ncu --clock-control none -k regex:spec_dec_attention --launch-skip 3 --launch-count 1 \\
        python benchmarks/profile_row.py attention "32/8/128 q=4 8k b=64 fp8"
    ncu --clock-control none -k regex:mamba2 --launch-skip 3 --launch-count 1 \\
        python benchmarks/profile_row.py mamba2 "bf16 T=4 b=32 chain"

Rows are named as in ``probe_cache_hints.py`` (attention: "Hq/Hkv/D q=N CTXk b=B KV", N = 1,
4 = chain, 16 / 64 = random trees; Mamba2: "STATE T=N b=B chain|tree[ H=32][ tiling=T,R,P]"
at H = 128, G = 8 (H = 32, G = 2: the TP=4 slice), P = 64, N = 128, in the benchmark's engine
mode, with the op's tiling or the one given as TPR,ROWS,RPT). ``JK_PROFILE_MACROS="NAME=V,..."``
compiles the family with extra macros (a probe variant) instead of the default.
"""

from __future__ import annotations

import os
import random
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from probe_cache_hints import derived, use_mamba2  # noqa: E402

CALLS = 6


def macros() -> dict:
    spec = os.environ.get("JK_PROFILE_MACROS", "")
    return {k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}


def attention(name: str):
    import spec_dec_attention as sb
    sda = sys.modules["jitkern.ops.spec_dec_attention"]
    m = re.fullmatch(r"(\d+)/(\d+)/(\d+) q=(\d+) (\d+)k b=(\d+) (bf16|fp8)", name)
    if not m:
        raise SystemExit(f"attention row {name!r}: expected 'Hq/Hkv/D q=N CTXk b=B bf16|fp8'")
    hq, hkv, d, n, ctx, batch = (int(v) for v in m.groups()[:6])
    ctx *= 1024
    mac = macros()
    if mac:
        sda.SPEC_DEC_ATTENTION = derived(sda.SPEC_DEC_ATTENTION, "profile", mac)
        sda._LAUNCH.clear()
    kv = torch.float8_e4m3fn if m.group(7) == "fp8" else torch.bfloat16
    draft = sb.chain_parents(n) if n <= 4 else sb.random_eagle_tree(n, random.Random(n))
    s = sb.build(batch, hq, hkv, d, ctx - n, draft, kv)
    out = torch.empty_like(s["q"])
    return lambda: sda.spec_dec_attention(**s, out=out)


def mamba2(name: str):
    import mamba2_mtp as mb
    m = re.fullmatch(r"(fp32|bf16) T=(\d+) b=(\d+) (chain|tree)( H=32)?( tiling=\d+,\d+,\d+)?",
                     name)
    if not m:
        raise SystemExit(f"mamba2 row {name!r}: expected 'fp32|bf16 T=N b=B chain|tree"
                         f"[ H=32][ tiling=TPR,ROWS,RPT]'")
    sd = torch.float32 if m.group(1) == "fp32" else torch.bfloat16
    T, Bt, tree = int(m.group(2)), int(m.group(3)), m.group(4) == "tree"
    H, G = (32, 2) if m.group(5) else (128, 8)
    tiling = tuple(int(v) for v in m.group(6).split("=")[1].split(",")) if m.group(6) else None
    use_mamba2({}, "profile", macros())
    p = mb.Problem(H, G, 64, 128, T, Bt, sd, tree, **mb.call_mode(T))
    return p.jitkern_call(0, tiling)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("attention", "mamba2"):
        raise SystemExit(__doc__)
    call = (attention if sys.argv[1] == "attention" else mamba2)(sys.argv[2])
    for _ in range(CALLS):
        call()
    torch.cuda.synchronize()
    print(f"{sys.argv[2]}: {CALLS} calls done", flush=True)


if __name__ == "__main__":
    main()
