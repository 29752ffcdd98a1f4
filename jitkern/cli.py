"""The ``jitkern`` command line: warm a cache ahead of time, inspect the setup."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _warmup_jobs(families, archs):
    jobs = []
    for fam in families:
        for cfg in fam.warmup_configs():
            for arch in archs:
                jobs.append((fam, cfg, arch))
    return jobs


def cmd_warmup(args) -> int:
    from . import service, settings, stats, toolchain
    from .errors import CompileError, JitkernError
    from .family import registered

    families = registered()
    archs = args.arch or ([settings.arch_override()] if settings.arch_override() else [])
    if not archs:
        cap = service._local_capability()
        if cap is None:
            print("jitkern warmup: no GPU here and no target given; pass --arch (e.g. --arch sm_90a)",
                  file=sys.stderr)
            return 2
        archs = [f"sm_{cap[0]}{cap[1]}"]
    try:
        archs = [toolchain.normalize_arch(a) for a in archs]
    except ValueError as e:
        print(f"jitkern warmup: {e}", file=sys.stderr)
        return 2
    jobs = _warmup_jobs(families, archs)
    t0 = time.perf_counter()
    compiled = cached = 0
    failures = []
    for fam, cfg, arch in jobs:
        before = stats()["compiles"]
        try:
            service.compile(fam, cfg, arch=arch)
        except (CompileError, JitkernError, ValueError) as e:
            failures.append({"family": fam.name, "config": cfg, "arch": arch, "error": str(e)})
            continue
        if stats()["compiles"] > before:
            compiled += 1
        else:
            cached += 1
    seconds = time.perf_counter() - t0
    summary = {"compiled": compiled, "cached": cached, "failed": len(failures),
               "seconds": round(seconds, 3), "archs": archs,
               "families": [f.name for f in families], "cache_dir": str(settings.cache_dir()),
               "failures": failures}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"families: {', '.join(summary['families'])}; targets: {', '.join(archs)}")
        print(f"compiled {compiled}, already cached {cached}, failed {len(failures)} "
              f"in {seconds:.2f} s -> {settings.cache_dir()}")
        for f in failures:
            print(f"FAILED {f['family']} {f['config']} {f['arch']}:\n{f['error']}", file=sys.stderr)
    return 1 if failures else 0


def cmd_info(args) -> int:
    import importlib.metadata as md

    from . import __version__, settings, toolchain

    info = {"jitkern": __version__}
    for pkg in ("cupy-cuda13x", "torch", "diskcache", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        info["nvrtc"] = toolchain.nvrtc_version()
        info["cuda_include"] = str(toolchain.cuda_include_dir())
    except Exception as e:
        info["toolchain_error"] = str(e)
    info["cache_dir"] = str(settings.cache_dir())
    info["cache_path"] = [str(p) for p in settings.aot_dirs()]
    print(json.dumps(info, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jitkern", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("warmup", help="compile the built-in kernel set into the cache",
                       epilog="example: jitkern warmup --arch sm_90a --json")
    w.add_argument("--arch", action="append", help="target, e.g. sm_90a (repeatable); default: the local GPU")
    w.add_argument("--json", action="store_true", help="print one JSON object")
    w.set_defaults(fn=cmd_warmup)
    i = sub.add_parser("info", help="versions, headers, cache paths")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
