"""JIT service costs, in one run: cold compile per family, the first call of a fresh process with a
warm disk cache against a bare CuPy load, and the per-call host overhead of a memory hit against a
bare CuPy launch and a trivial torch op.

    python benchmarks/jit_overhead.py            # GPU machine: everything
    python benchmarks/jit_overhead.py --cpu      # no GPU: cold compile seconds only (--arch)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cold_compile_table(arch: str) -> list[dict]:
    """Compile every registered family's warm-up set in a fresh process and empty cache."""
    code = f"""
import json, time, jitkern, jitkern.toolchain
from jitkern.family import registered
rows = []
for fam in registered():
    secs = []
    for cfg in fam.warmup_configs():
        t = time.perf_counter()
        e = jitkern.compile(fam, cfg, arch={arch!r})
        secs.append(time.perf_counter() - t)
    if secs:
        rows.append(dict(family=fam.name, configs=len(secs), total_s=sum(secs), first_s=secs[0],
                         median_s=sorted(secs)[len(secs) // 2], max_s=max(secs),
                         nvrtc=jitkern.toolchain.nvrtc_version()))
print(json.dumps(rows))
"""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, JITKERN_CACHE_DIR=d, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


FIRST_CALL = """
import json, sys, time
import torch, cupy, numpy as np
torch.zeros(1, device="cuda"); torch.cuda.synchronize()          # context up front, for both
mode = sys.argv[1]
if mode == "bare":
    cubin = open(sys.argv[2], "rb").read()
    t = time.perf_counter()
    m = cupy.cuda.function.Module(); m.load(cubin); f = m.get_function(sys.argv[3])
    dt = time.perf_counter() - t
else:
    import jitkern
    from jitkern.families.selftest import SELFTEST
    t = time.perf_counter()
    k = jitkern.get_kernel(SELFTEST, {"dtype": "fp32", "unroll": 4}, torch.device("cuda"))
    dt = time.perf_counter() - t
    assert jitkern.stats()["compiles"] == 0 and jitkern.stats()["disk_hits"] == 1
print(json.dumps(dt))
"""


def first_call(repeats: int = 7) -> dict:
    import jitkern
    from jitkern.families.selftest import SELFTEST

    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, JITKERN_CACHE_DIR=d, PYTHONPATH=str(ROOT))
        os.environ["JITKERN_CACHE_DIR"] = d
        import torch

        cap = torch.cuda.get_device_capability()
        e = jitkern.compile(SELFTEST, {"dtype": "fp32", "unroll": 4}, arch=f"sm_{cap[0]}{cap[1]}")
        jitkern.service.SERVICE.disk.close()
        cubin = Path(d) / "cubin.bin"
        cubin.write_bytes(e.cubin)
        res = {"bare": [], "jitkern": []}
        for _ in range(repeats):
            for mode in res:
                out = subprocess.run([sys.executable, "-c", FIRST_CALL, mode, str(cubin),
                                      e.lowered_names["axpy"]], env=env, capture_output=True,
                                     text=True)
                if out.returncode:
                    raise RuntimeError(out.stderr)
                res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {m: statistics.median(v) for m, v in res.items()}


def host_overhead(n_calls: int = 20000) -> dict:
    import cupy
    import numpy as np
    import torch

    import jitkern
    from jitkern.families.selftest import SELFTEST

    cfg = {"dtype": "fp32", "unroll": 1}
    dev = torch.device("cuda")
    x = torch.randn(256, device=dev)
    y = torch.randn(256, device=dev)
    k = jitkern.get_kernel(SELFTEST, cfg, dev)
    a, n = np.float32(1.0), 256
    m = cupy.cuda.function.Module()
    m.load(k.entry.cubin)
    f = m.get_function(k.entry.lowered_names["axpy"])
    xp, yp = np.uint64(x.data_ptr()), np.uint64(y.data_ptr())
    with warnings.catch_warnings():  # ExternalStream: deprecated in CuPy 14, still the plain way
        warnings.simplefilter("ignore", DeprecationWarning)
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    def jit_path():
        jitkern.get_kernel(SELFTEST, cfg, dev).launch("axpy", (1,), (256,), (y, x, a, n))

    def launch_only():
        k.launch("axpy", (1,), (256,), (y, x, a, n))

    def bare_cupy():
        f((1,), (256,), (yp, xp, a, np.int64(n)), stream=stream)

    def torch_op():
        y.add_(1.0)

    out = {}
    for name, fn in (("jitkern get_kernel+launch", jit_path), ("jitkern launch only", launch_only),
                     ("bare CuPy launch", bare_cupy), ("torch y.add_(1)", torch_op)):
        samples = []
        for _ in range(5):
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n_calls):
                fn()
            samples.append((time.perf_counter() - t) / n_calls)
            torch.cuda.synchronize()
        out[name] = statistics.median(samples)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="no GPU: cold compile only")
    ap.add_argument("--arch", default=None, help="compile target (default: the GPU's)")
    args = ap.parse_args()
    arch = args.arch
    if not args.cpu:
        import torch

        cap = torch.cuda.get_device_capability()
        arch = arch or f"sm_{cap[0]}{cap[1]}"
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    arch = arch or "sm_90"
    print(f"\n## cold compile, {os.cpu_count()} CPU cores, target {arch} (fresh process, empty cache)")
    print("(the families compile one after another in one process: 'first' is a family's first")
    print(" configuration, 'median' over all of its configurations)")
    print(f"{'family':28s} {'configs':>7s} {'total s':>8s} {'first s':>8s} {'median s':>9s} {'max s':>7s} NVRTC")
    for r in cold_compile_table(arch):
        print(f"{r['family']:28s} {r['configs']:7d} {r['total_s']:8.2f} {r['first_s']:8.3f} "
              f"{r['median_s']:9.3f} {r['max_s']:7.3f} {r['nvrtc']}")
    if args.cpu:
        return
    fc = first_call()
    print("\n## first call in a fresh process, warm disk cache (median of 7 processes)")
    print(f"bare CuPy Module.load + get_function : {fc['bare'] * 1e3:7.2f} ms")
    print(f"jitkern get_kernel (lookup + load)   : {fc['jitkern'] * 1e3:7.2f} ms "
          f"(+{(fc['jitkern'] - fc['bare']) * 1e3:.2f} ms over bare; goal < 10 ms)")
    ho = host_overhead()
    print("\n## per-call host overhead (median of 5 x 20000 calls)")
    bare = ho["bare CuPy launch"]
    for name, v in ho.items():
        print(f"{name:28s} {v * 1e6:7.2f} us  ({v / bare:4.2f}x bare CuPy)")
    print("goal: memory-hit path (get_kernel+launch) within 1.5x of the bare CuPy launch")


if __name__ == "__main__":
    main()
