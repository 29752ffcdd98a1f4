"""``jitkern warmup``: compile a set of kernel configurations into the cache ahead of time."""

from __future__ import annotations

import json
import signal
import sys
import time

from .common import CliError, HelpFormatter, check_targets, cpu_count, human_bytes, requested_archs, table

EPILOG = """\
examples:
  jitkern warmup --arch sm_90a                     # the built-in set, for H100/H200
  jitkern warmup --preset llama-3.1-70b --tp 8 --arch sm_90a
  jitkern warmup --preset nemotron-h-8b --arch sm_90a --arch sm_100a -j 8
  jitkern warmup --manifest kernels.toml --dry-run # what would be compiled, and what is cached
  jitkern warmup --arch sm_90a --json              # one JSON object for scripts

--arch names the GPU you deploy on; each family is compiled for the exact target the run time
picks on that GPU (sm_90a for families with arch-specific instructions, sm_90 otherwise). Without
--arch: the manifest's 'arch', else $JITKERN_ARCH (used exactly, as at run time), else this
machine's GPU. Interrupting (Ctrl-C) keeps what is compiled; run the same command to continue.
Exit status: 0 all present, 1 some failed, 2 bad arguments, 130 interrupted."""


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="compile kernels into the cache ahead of time",
                       description="Compile a set of kernel configurations into the cache: the "
                       "built-in set (every family's warm-up configurations), model presets "
                       "(jitkern presets) or manifest files.",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--arch", action="append", metavar="SM",
                   help="GPU architecture to compile for, e.g. sm_90a (repeatable)")
    p.add_argument("--exact-arch", action="store_true",
                   help="compile every family for --arch exactly as given (for $JITKERN_ARCH deployments)")
    p.add_argument("--preset", action="append", metavar="NAME",
                   help="a model preset (repeatable; see `jitkern presets`)")
    p.add_argument("--tp", type=int, metavar="N", help="tensor-parallel size for --preset "
                   "(default: the preset's)")
    p.add_argument("--manifest", action="append", metavar="FILE",
                   help="a TOML or JSON file of families and parameter grids (repeatable)")
    p.add_argument("--family", action="append", metavar="NAME",
                   help="only these families (repeatable)")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help=f"parallel compile processes (default: CPU count, {cpu_count()} here)")
    p.add_argument("--dry-run", action="store_true", help="list what would be compiled; compile nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress still on stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(fn=run)


def _items(args, families):
    from . import jobs as J
    from .manifest import ManifestError, load

    if args.tp is not None and not args.preset:
        raise CliError("--tp applies to --preset; add --preset NAME")
    items, manifest_archs = [], []
    for name in args.preset or []:
        items += J.preset_items([name], args.tp, families)
    for path in args.manifest or []:
        try:
            m = load(path, families)
        except ManifestError as e:
            raise CliError(str(e)) from None
        items += [(fam, cfg, str(path)) for fam, cfg in m.items]
        manifest_archs += [a for a in (m.archs or []) if a not in manifest_archs]
    if not args.preset and not args.manifest:
        items = J.default_items(families)
    return items, manifest_archs


def run(args) -> int:
    from .. import settings
    from ..errors import ToolchainError
    from . import jobs as J

    t0 = time.perf_counter()
    if args.jobs is not None and args.jobs < 1:
        raise CliError(f"-j must be at least 1, got {args.jobs}")
    families = J.families_by_name(args.family)
    items, manifest_archs = _items(args, families)
    archs, exact = requested_archs(args.arch, manifest_archs)
    exact = exact or args.exact_arch
    try:
        jobs = J.build(items, families, archs, exact)
    except ToolchainError as e:
        raise CliError(str(e)) from None
    if not args.dry_run:
        _check_writable()
    dropped = J.mark_cached(jobs, touch=not args.dry_run)
    todo = [j for j in jobs if j.status != "cached"]
    # only what must be compiled needs NVRTC loaded (an all-cached run never loads it)
    check_targets(j.target for j in todo)
    if args.dry_run:
        return _dry_run(args, jobs, todo)

    from .progress import Progress
    from .runner import run_parallel, run_serial

    processes = min(args.jobs or cpu_count(), max(1, len(todo)))
    if processes > 1:
        _longest_first(todo)
    progress = Progress(len(todo), quiet=args.quiet)
    if dropped:
        progress.note(f"dropped {dropped} damaged cache entr{'y' if dropped == 1 else 'ies'}; "
                      "compiling them again")
    if len(jobs) > len(todo):
        progress.note(f"{len(jobs) - len(todo)} of {len(jobs)} kernels already cached")
    interrupted = False
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if processes > 1:
            run_parallel(todo, processes, progress)
        else:
            run_serial(todo, progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, old_term)
        progress.close()
    summary = _summary(jobs, archs, processes, time.perf_counter() - t0, settings.cache_dir(),
                       dropped, interrupted)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary, jobs)
    if interrupted:
        left = sum(1 for j in jobs if j.status == "pending")
        print(f"jitkern warmup: interrupted with {left} kernel(s) left; what was compiled is kept. "
              f"Run the same command again to continue.", file=sys.stderr)
        return 130
    return 1 if summary["failed"] else 0


def _longest_first(jobs) -> None:
    """Order jobs by their family's source size, largest first (a proxy for compile time): the
    short ones then fill the end and no worker idles long behind a late, long compile."""
    from ..service import SERVICE

    size = {}
    for j in jobs:
        if j.family.name not in size:
            c = SERVICE.closure(j.family)
            size[j.family.name] = len(c.main_text) + sum(len(t) for _, t in c.headers)
    jobs.sort(key=lambda j: -size[j.family.name])


def _check_writable() -> None:
    """A warm-up into a cache that cannot be written would compile everything and keep nothing."""
    import warnings

    from ..service import SERVICE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        disk = SERVICE.disk
    if not disk.writable:
        raise CliError(f"the cache directory {disk.directory} is not writable ({disk.reason}); "
                       "set JITKERN_CACHE_DIR to a writable directory")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _dry_run(args, jobs, todo) -> int:
    if args.json:
        print(json.dumps({"dry_run": True, "to_compile": len(todo), "cached": len(jobs) - len(todo),
                          "jobs": [j.as_dict() for j in jobs]}))
        return 0
    rows = [["cached" if j.status == "cached" else "compile", j.target, j.name, j.key[:12],
             j.source] for j in jobs]
    table(rows, ["status", "target", "kernel", "key", "from"])
    print(f"{len(todo)} to compile, {len(jobs) - len(todo)} already cached")
    return 0


def _summary(jobs, archs, processes, seconds, cache_dir, dropped, interrupted) -> dict:
    groups: dict = {}
    for j in jobs:
        g = groups.setdefault((j.family.name, j.target), {
            "family": j.family.name, "arch": j.target, "compiled": 0, "cached": 0, "failed": 0,
            "pending": 0, "bytes": 0, "compile_seconds": 0.0})
        g[j.status] += 1
        g["bytes"] += j.bytes
        g["compile_seconds"] = round(g["compile_seconds"] + j.seconds, 4)
    count = {s: sum(1 for j in jobs if j.status == s) for s in ("compiled", "cached", "failed", "pending")}
    return {
        "compiled": count["compiled"], "cached": count["cached"], "failed": count["failed"],
        "not_done": count["pending"], "total": len(jobs), "seconds": round(seconds, 3),
        "bytes": sum(j.bytes for j in jobs),
        "compiled_bytes": sum(j.bytes for j in jobs if j.status == "compiled"),
        "compile_seconds": round(sum(j.seconds for j in jobs), 4),
        "archs": archs, "targets": sorted({j.target for j in jobs}),
        "families": sorted({j.family.name for j in jobs}), "processes": processes,
        "cache_dir": str(cache_dir), "dropped_corrupt": dropped, "interrupted": interrupted,
        "by_family": list(groups.values()),
        "failures": [j.as_dict() for j in jobs if j.status == "failed"],
    }


def _print_summary(s: dict, jobs) -> None:
    rows = [[g["family"], g["arch"], g["compiled"], g["cached"], g["failed"],
             human_bytes(g["bytes"]), f"{g['compile_seconds']:.2f}"] for g in s["by_family"]]
    rows.append(["total", "", s["compiled"], s["cached"], s["failed"], human_bytes(s["bytes"]),
                 f"{s['compile_seconds']:.2f}"])
    table(rows, ["family", "target", "compiled", "already cached", "failed", "bytes",
                 "compile s"], right={2, 3, 4, 5, 6})
    print(f"{s['seconds']:.2f} s wall with {s['processes']} process"
          f"{'es' if s['processes'] > 1 else ''} -> {s['cache_dir']}")
    for j in jobs:
        if j.status == "failed":
            print(f"\nFAILED {j.name} ({j.target}) from {j.source}:\n{j.error}", file=sys.stderr)
