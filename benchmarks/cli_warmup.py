"""Warm-up of the built-in kernel set through the real CLI, end to end (process start to exit):
cold with -j 1 and -j N (fresh cache directories), then the all-cached rerun.

    python benchmarks/cli_warmup.py [--arch sm_90a] [--repeats 3] [--jobs 2]

Prints one table (median and min wall seconds over the repeats) and the NVRTC seconds per family.
Goal: the all-cached rerun under 2 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cache_dir: Path, arch: str, jobs: int) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    env["JITKERN_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jitkern.cli", "warmup", "--arch", arch, "-j",
                           str(jobs), "--json", "-q"], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"warm-up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, json.loads(proc.stdout)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cached-runs", type=int, default=5)
    args = ap.parse_args()

    rows = {"cold -j 1": [], f"cold -j {args.jobs}": [], "all cached (rerun)": []}
    inside = {k: [] for k in rows}
    nvrtc = {k: [] for k in rows}  # summed NVRTC seconds: grows when processes share a core
    load_before = f"{os.getloadavg()[0]:.2f}"
    last = {}
    per_family: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for jobs in (1, args.jobs):
                name = f"cold -j {jobs}"
                wall, out = run(Path(tmp) / f"r{r}j{jobs}", args.arch, jobs)
                assert out["compiled"] == out["total"] and out["cached"] == 0, out
                rows[name].append(wall)
                inside[name].append(out["seconds"])
                nvrtc[name].append(out["compile_seconds"])
                last[name] = out
                if jobs == 1:
                    for g in out["by_family"]:
                        per_family.setdefault(g["family"], []).append(
                            (g["compiled"], g["compile_seconds"], g["bytes"]))
            for _ in range(args.cached_runs):
                wall, out = run(Path(tmp) / f"r{r}j{args.jobs}", args.arch, args.jobs)
                assert out["compiled"] == 0 and out["cached"] == out["total"], out
                rows["all cached (rerun)"].append(wall)
                inside["all cached (rerun)"].append(out["seconds"])
                nvrtc["all cached (rerun)"].append(out["compile_seconds"])
                last["all cached (rerun)"] = out

    total = last["cold -j 1"]["total"]
    print(f"device: {cpu_name()}, {os.cpu_count()} CPUs; python {platform.python_version()}; "
          f"target {args.arch} -> {', '.join(last['cold -j 1']['targets'])}; "
          f"{total} kernels ({', '.join(last['cold -j 1']['families'])}); "
          f"{args.repeats} repeats, {args.cached_runs} cached runs each")
    print(f"load average before: {load_before}; after: {os.getloadavg()[0]:.2f} (other processes "
          "share these CPUs)")
    print(f"{'run':<22}{'kernels':>8}{'compiled':>9}{'wall s median':>15}{'min':>8}"
          f"{'in-command s':>14}{'NVRTC s summed':>16}")
    for name, walls in rows.items():
        out = last[name]
        print(f"{name:<22}{out['total']:>8}{out['compiled']:>9}{statistics.median(walls):>15.2f}"
              f"{min(walls):>8.2f}{statistics.median(inside[name]):>14.2f}"
              f"{statistics.median(nvrtc[name]):>16.2f}")
    cold1 = statistics.median(rows["cold -j 1"])
    coldn = statistics.median(rows[f"cold -j {args.jobs}"])
    print(f"speed-up -j {args.jobs} over -j 1: {cold1 / coldn:.2f}x; all-cached rerun: "
          f"{statistics.median(rows['all cached (rerun)']):.2f} s (goal < 2 s)")
    print(f"\n{'family':<24}{'kernels':>8}{'NVRTC s / kernel':>18}{'cubin KiB / kernel':>20}")
    for fam, runs in sorted(per_family.items()):
        n = runs[0][0]
        secs = statistics.median(s for _, s, _ in runs) / max(1, n)
        kib = runs[0][2] / 1024 / max(1, n)
        print(f"{fam:<24}{n:>8}{secs:>18.3f}{kib:>20.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
