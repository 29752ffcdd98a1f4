"""``jitkern info``: versions, device and targets, CUDA headers, cache paths and sizes, remote tier."""

from __future__ import annotations

import json

from .cache import print_remote
from .common import HelpFormatter, human_bytes

EPILOG = """\
examples:
  jitkern info
  jitkern info --json | python -c 'import json,sys; print(json.load(sys.stdin)["nvrtc"])'"""

PACKAGES = ("cupy-cuda13x", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "torch", "diskcache", "redis")


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, GPU and target, headers, cache paths and sizes",
                       description="Show what jitkern runs with: package and NVRTC versions, the "
                       "GPU and the target it gets, where the CUDA headers come from, the cache "
                       "directories and their sizes, and the remote tier's state.",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=run)


def _device() -> dict:
    """GPU 0 and the driver through CuPy (importing torch here would cost a second)."""
    try:
        from cupy.cuda import runtime

        n = runtime.getDeviceCount()
    except Exception as e:
        return {"count": 0, "note": f"no CUDA device ({type(e).__name__})"}
    out = {"count": n}
    try:
        out["driver"] = runtime.driverGetVersion()
    except Exception:
        pass
    if n:
        props = runtime.getDeviceProperties(0)
        name = props["name"]
        out["name"] = name.decode() if isinstance(name, bytes) else name
        out["capability"] = f"{props['major']}.{props['minor']}"
        out["target"] = f"sm_{props['major']}{props['minor']}"
    return out


def collect() -> dict:
    import importlib.metadata as md

    from .. import __version__, settings, toolchain
    from ..family import registered
    from .cache import tier_stats

    info = {"jitkern": __version__, "packages": {}}
    for pkg in PACKAGES:
        try:
            info["packages"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info["packages"][pkg] = None
    try:
        info["nvrtc"] = toolchain.nvrtc_version()
        info["nvrtc_targets"] = [f"sm_{a}" for a in toolchain.supported_archs()]
    except Exception as e:
        info["nvrtc"] = None
        info["toolchain_error"] = str(e)
    try:
        info["cuda_include"] = str(toolchain.cuda_include_dir())
    except Exception as e:
        info["cuda_include"] = None
        info["toolchain_error"] = str(e)
    info["device"] = _device()
    info["arch_override"] = settings.arch_override()
    info["families"] = [{"name": f.name, "params": [p.name for p in f.params],
                         "warmup_configs": len(f.warmup), "arch_specific": f.arch_specific}
                        for f in registered()]

    class _A:
        cache_dir = None

    info["cache"] = tier_stats(_A())
    info["remote"] = info["cache"].pop("remote")
    info["lock_timeout_s"] = settings.lock_timeout()
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info))
        return 0
    pk = info["packages"]
    print(f"jitkern {info['jitkern']}  NVRTC {info['nvrtc'] or 'NOT AVAILABLE'}  "
          + "  ".join(f"{k} {v}" for k, v in pk.items() if v))
    if info.get("toolchain_error"):
        print(f"toolchain problem: {info['toolchain_error']}")
    d = info["device"]
    if d.get("count"):
        print(f"GPU: {d['name']} (compute capability {d['capability']}, {d['target']}), "
              f"{d['count']} device(s), driver {d.get('driver')}")
    else:
        print("GPU: none (compile with --arch / JITKERN_ARCH; " + d.get("note", "") + ")")
    if info["arch_override"]:
        print(f"JITKERN_ARCH: {info['arch_override']}")
    if info.get("nvrtc_targets"):
        print(f"NVRTC targets: {', '.join(info['nvrtc_targets'])}")
    print(f"CUDA headers: {info['cuda_include']}")
    c = info["cache"]
    print(f"cache: {c['cache_dir']}: {c['entries']} entries, {human_bytes(c['bytes'])} "
          f"(limit {human_bytes(c['size_limit'])})")
    for ro in c["read_only"]:
        print(f"read-only cache: {ro['path']}: "
              + (f"{ro['entries']} entries" if ro["available"] else "not available"))
    print_remote(info["remote"])
    print("families: " + ", ".join(f"{f['name']} ({f['warmup_configs']} warm-up)"
                                    for f in info["families"]))
    return 0
