"""The first call of a kernel on a fresh node: fetched from the Redis tier vs compiled, one run.

Each measurement is a fresh process with an empty disk cache (a new node or replica) that calls
``jitkern.compile`` once for one configuration; the time of that call is what the node waits
before it can launch. Modes, per configuration:

  compile       no remote tier: key + NVRTC compile + disk write
  compile+put   remote tier configured, key absent: lookup miss + compile + disk write + put
  remote hit    the entry is in Redis: lookup + HMAC and SHA-256 checks + disk write
  disk hit      the node's own disk cache holds it (for reference)

and "compile" and "remote hit" again on a node whose toolchain memo (NVRTC version, header
digest; see jitkern.toolchain) is already there, which isolates what the tier saves from the
one-time cost of loading NVRTC to compute the key.

Times are medians over --reps processes after one discarded warm-up process per mode. The Redis
is a local redis-server on loopback started by this script (or --url): a fleet's Redis across a
network adds its round-trip time to "remote hit" and "put".

    python benchmarks/remote_cache.py [--reps 7] [--arch sm_90a] [--url redis://host:6379/0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SECRET = "benchmark-fleet-secret-0123456789abcdef"

CHILD = r"""
import json, sys, time
import jitkern
from jitkern.family import get_family
from jitkern.service import SERVICE
fam = get_family(sys.argv[1]); cfg = json.loads(sys.argv[2]); arch = sys.argv[3]
tier = SERVICE.remote_tier()
timing = {"get": 0.0, "put": 0.0, "key": 0.0}


def timed(obj, name, slot):
    orig = getattr(obj, name)

    def wrapper(*a):
        t0 = time.perf_counter()
        try:
            return orig(*a)
        finally:
            timing[slot] += time.perf_counter() - t0
    setattr(obj, name, wrapper)


timed(SERVICE, "key_for", "key")  # NVRTC version and CUDA header digest on a fresh node
if tier is not None:
    timed(tier, "get", "get")
    timed(tier, "put", "put")
t0 = time.perf_counter()
e = jitkern.compile(fam, cfg, arch=arch)
first = time.perf_counter() - t0
s = jitkern.stats()
print(json.dumps({"first": first, "get": timing["get"], "put": timing["put"], "key": timing["key"],
                  "compile": s["compile_seconds"], "compiles": s["compiles"],
                  "remote_hits": s["remote_hits"], "disk_hits": s["disk_hits"],
                  "remote_writes": s["remote_writes"], "size": len(e.cubin)}))
"""


def configurations() -> list[tuple[str, dict, str]]:
    """(family, config, short label): the selftest family and each kernel family's first warm-up
    configuration (a real model's specialization)."""
    from jitkern.family import get_family, registered

    import jitkern.families  # noqa: F401  (registers the built-in families)

    rows = [("selftest", {"dtype": "fp32", "unroll": 1}, "fp32 unroll=1"),
            ("selftest", {"dtype": "bf16", "unroll": 8}, "bf16 unroll=8")]
    names = {f.name for f in registered()}
    for name in ("mamba2_mtp_ssm_update", "spec_dec_attention"):
        if name in names:
            fam = get_family(name)
            cfg = dict(fam.warmup_configs()[0])
            label = ", ".join(f"{k}={v}" for k, v in cfg.items()
                              if k in ("N", "TPR", "ROWS", "state_dtype", "tree", "head_dim",
                                       "dtype", "kv_dtype", "page_size", "mode"))
            rows.append((name, cfg, label))
    return rows


MODES = ("compile", "compile+put", "remote hit", "disk hit", "compile (memo)", "remote hit (memo)")


def run_child(env: dict, family: str, cfg: dict, arch: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, family, json.dumps(cfg), arch], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{family} {cfg}: child failed\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(family: str, cfg: dict, arch: str, url: str, reps: int, work: Path) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    remote = dict(JITKERN_REMOTE_CACHE=url, JITKERN_REMOTE_CACHE_KEY=SECRET)
    tag = f"{family}-{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**8}"
    def fresh_dir() -> str:  # a new node: nothing cached, not even the toolchain memo
        return tempfile.mkdtemp(prefix="node-", dir=work)

    def env_for(mode: str, rep: int) -> dict:
        env = dict(base, JITKERN_CACHE_DIR=fresh_dir())
        if mode.endswith("(memo)"):  # the node knows its toolchain (NVRTC version, header digest)
            shutil.copy(work / f"disk-{tag}" / "toolchain.json", env["JITKERN_CACHE_DIR"])
        if mode == "compile+put":  # a namespace of its own each time: always a miss
            env.update(remote, JITKERN_REMOTE_CACHE_NAMESPACE=f"bench-miss-{tag}-{rep}-{time.time_ns()}")
        elif mode.startswith("remote hit"):
            env.update(remote, JITKERN_REMOTE_CACHE_NAMESPACE=f"bench-hit-{tag}")
        elif mode == "disk hit":
            env["JITKERN_CACHE_DIR"] = str(work / f"disk-{tag}")
        return env

    # fill the shared namespace and the reference disk cache once
    seed = run_child(dict(base, **remote, JITKERN_REMOTE_CACHE_NAMESPACE=f"bench-hit-{tag}",
                          JITKERN_CACHE_DIR=str(work / f"disk-{tag}")), family, cfg, arch)
    assert seed["remote_writes"] == 1, seed
    out = {"size": seed["size"]}
    for mode in MODES:
        run_child(env_for(mode, -1), family, cfg, arch)  # warm-up (page cache, imports)
        runs = [run_child(env_for(mode, rep), family, cfg, arch) for rep in range(reps)]
        expect = {"compile": "compiles", "compile+put": "remote_writes", "remote hit": "remote_hits",
                  "disk hit": "disk_hits"}[mode.split(" (")[0]]
        assert all(r[expect] == 1 for r in runs), (mode, runs)
        if mode.startswith("remote hit"):
            assert all(r["compiles"] == 0 for r in runs)
        out[mode] = {k: statistics.median(r[k] for r in runs) for k in ("first", "get", "put", "compile", "key")}
    return out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--url", help="an existing Redis (default: start a local redis-server)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    import redis as redis_py

    from redis_server import RedisServer

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        server = None
        url = args.url
        if not url:
            server = RedisServer(work / "redis").start()
            url = server.url
        try:
            version = redis_py.Redis.from_url(url).info("server")["redis_version"]
            print(f"# first call on a fresh node: remote hit vs compile; {cpu_name()}; "
                  f"redis-server {version} on loopback; target {args.arch}; median of {args.reps} "
                  f"processes; {time.strftime('%Y-%m-%d')}")
            rows = []
            for family, cfg, label in configurations():
                r = measure(family, cfg, args.arch, url, args.reps, work)
                rows.append(dict(family=family, config=label, **r))
        finally:
            if server is not None:
                server.stop()

    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    print("\nfresh node (empty cache directory):\n")
    head = ("| family | configuration | cubin KiB | key ms | compile: first call ms (NVRTC ms) "
            "| compile+put: first call ms (put ms) | remote hit: first call ms (get ms) "
            "| disk hit: first call ms | first call: compile / remote hit | NVRTC / get |")
    print(head)
    print("|" + "---|" * 10)
    for r in rows:
        c, cp, rh, dh = r["compile"], r["compile+put"], r["remote hit"], r["disk hit"]
        print(f"| {r['family']} | {r['config']} | {r['size'] / 1024:.1f} | {ms(rh['key'])} "
              f"| {ms(c['first'])} ({ms(c['compile'])}) | {ms(cp['first'])} ({ms(cp['put'])}) "
              f"| {ms(rh['first'])} ({ms(rh['get'])}) | {ms(dh['first'])} "
              f"| {c['first'] / rh['first']:.2f}x | {c['compile'] / rh['get']:.0f}x |")
    print("\nfresh node whose toolchain memo is present (the key needs no NVRTC load):\n")
    print("| family | configuration | key ms | compile: first call ms | remote hit: first call ms "
          "| first call: compile / remote hit |")
    print("|" + "---|" * 6)
    for r in rows:
        c, rh = r["compile (memo)"], r["remote hit (memo)"]
        print(f"| {r['family']} | {r['config']} | {ms(rh['key'])} | {ms(c['first'])} | {ms(rh['first'])} "
              f"| {c['first'] / rh['first']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
