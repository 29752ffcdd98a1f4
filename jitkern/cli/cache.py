"""``jitkern cache ls | stats | verify | prune | clear | export | import``."""

from __future__ import annotations

import json
import sys
import time

from .common import CliError, HelpFormatter, ago, human_bytes, parse_duration, table
from .store import CurrentKeys, cache_dir, open_disk, read_metadata

DESCRIPTION = """\
Inspect and maintain the writable kernel cache ($JITKERN_CACHE_DIR, default ~/.cache/jitkern;
--cache-dir picks another). Read-only directories ($JITKERN_CACHE_PATH) are shown by `stats`.

examples:
  jitkern cache ls --family spec_dec_attention --sort size
  jitkern cache stats --json
  jitkern cache verify                   # recheck every checksum, drop bad entries
  jitkern cache prune --max-size 2GiB --older-than 30d
  jitkern cache export kernels.jkb && jitkern cache import kernels.jkb
  jitkern cache clear --yes"""


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="inspect and maintain the kernel cache",
                       description=DESCRIPTION, formatter_class=HelpFormatter)
    cs = p.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    def cmd(name, help, epilog, fn):
        c = cs.add_parser(name, help=help, description=help, epilog=epilog,
                          formatter_class=HelpFormatter)
        c.add_argument("--cache-dir", metavar="DIR", help="the cache directory (default: "
                       "$JITKERN_CACHE_DIR or ~/.cache/jitkern)")
        c.set_defaults(fn=fn)
        return c

    c = cmd("ls", "list cached kernels: readable name, target, size, last use, hits",
            "examples:\n  jitkern cache ls\n  jitkern cache ls --family mamba2_mtp_ssm_update "
            "--arch sm_90 --grep state_dtype=fp32\n  jitkern cache ls --sort used --json", cmd_ls)
    c.add_argument("--family", action="append", metavar="NAME", help="only this family (repeatable)")
    c.add_argument("--arch", action="append", metavar="SM", help="only this target (repeatable)")
    c.add_argument("--grep", metavar="TEXT", help="only names containing TEXT")
    c.add_argument("--sort", choices=("name", "size", "used", "hits"), default="name")
    c.add_argument("--json", action="store_true", help="print a JSON list")

    c = cmd("stats", "totals of the cache tiers: entries, bytes, per family and target",
            "examples:\n  jitkern cache stats\n  jitkern cache stats --json", cmd_stats)
    c.add_argument("--json", action="store_true", help="print one JSON object")

    c = cmd("verify", "recheck every entry's checksum (and load it on a GPU when there is "
            "one); drop bad entries",
            "Exit status 1 when a bad entry was found.\n\nexamples:\n  jitkern cache verify\n"
            "  jitkern cache verify --keep --json   # report only", cmd_verify)
    c.add_argument("--keep", action="store_true", help="report bad entries without dropping them")
    c.add_argument("--no-load", action="store_true", help="skip the GPU load test")
    c.add_argument("--json", action="store_true", help="print one JSON object (checked, bad, ...)")

    c = cmd("prune", "drop least recently used entries down to a size, and/or unused ones",
            "examples:\n  jitkern cache prune --max-size 500MB\n  jitkern cache prune "
            "--older-than 30d\n  jitkern cache prune --stale   # built from other sources/NVRTC",
            cmd_prune)
    c.add_argument("--max-size", metavar="SIZE", help="keep the most recently used entries "
                   "that fit in SIZE (e.g. 500MB, 2GiB)")
    c.add_argument("--older-than", metavar="AGE", help="drop entries not used for AGE (e.g. 12h, 30d)")
    c.add_argument("--stale", action="store_true", help="drop entries this installation can "
                   "never use (other kernel sources, headers, NVRTC or options)")
    c.add_argument("--dry-run", action="store_true", help="list what would be dropped")
    c.add_argument("--json", action="store_true")

    c = cmd("clear", "remove every entry of the writable cache",
            "examples:\n  jitkern cache clear         # asks first\n  jitkern cache clear --yes",
            cmd_clear)
    c.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    from . import bundle

    c = cmd("export", "write the cache (or part of it) to a portable bundle file",
            "The bundle holds the entries and a manifest with each entry's key inputs and\n"
            "checksums. examples:\n  jitkern cache export kernels.jkb\n  jitkern cache export "
            "h100.jkb --arch sm_90 --arch sm_90a", bundle.cmd_export)
    c.add_argument("file", metavar="FILE")
    c.add_argument("--family", action="append", metavar="NAME", help="only this family (repeatable)")
    c.add_argument("--arch", action="append", metavar="SM", help="only this target (repeatable)")
    c.add_argument("--json", action="store_true")

    c = cmd("import", "verify a bundle and add its entries to the cache",
            "Refuses a damaged bundle, and one built with another NVRTC or for another GPU\n"
            "than this machine's (or --arch), unless --force.\n\nexamples:\n"
            "  jitkern cache import kernels.jkb\n  jitkern cache import kernels.jkb --arch sm_90a "
            "   # on a build box without the GPU", bundle.cmd_import)
    c.add_argument("file", metavar="FILE")
    c.add_argument("--arch", action="append", metavar="SM", help="the GPU the cache is for "
                   "(default: this machine's, if it has one)")
    c.add_argument("--force", action="store_true", help="import despite an NVRTC or target mismatch")
    c.add_argument("--json", action="store_true")


# ---- ls ----------------------------------------------------------------------------------------

def _entries(disk) -> list[dict]:
    """Index rows joined with entry metadata (name, family, arch, config)."""
    out = []
    for row in disk.rows():
        meta = read_metadata(disk, row) or {}
        out.append(dict(row, name=meta.get("name", "<unreadable entry>"),
                        family=meta.get("family", "?"), arch=meta.get("arch", "?"),
                        config=meta.get("config"), cubin_size=meta.get("cubin_size"),
                        compile_seconds=meta.get("compile_seconds"),
                        nvrtc=meta.get("nvrtc_version")))
    return out


def cmd_ls(args) -> int:
    disk = open_disk(args, write=False)
    rows = _entries(disk) if disk else []
    if args.family:
        rows = [r for r in rows if r["family"] in args.family]
    if args.arch:
        from .. import toolchain

        try:
            want = {toolchain.normalize_arch(a) for a in args.arch}
        except ValueError as e:
            raise CliError(f"--arch: {e}") from None
        rows = [r for r in rows if r["arch"] in want]
    if args.grep:
        rows = [r for r in rows if args.grep in r["name"]]
    order = {"name": lambda r: (r["name"], r["arch"]), "size": lambda r: -r["size"],
             "used": lambda r: -r["used"], "hits": lambda r: -r["hits"]}[args.sort]
    rows.sort(key=order)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("key", "name", "family", "arch", "config", "size",
                                              "stored", "used", "hits", "nvrtc")} for r in rows]))
        return 0
    if not rows:
        print(f"no cached kernels{' match' if disk else ''} in {cache_dir(args)}")
        return 0
    now = time.time()
    table([[r["name"], r["arch"], human_bytes(r["size"]), ago(r["used"], now), r["hits"],
            r["key"][:12]] for r in rows], ["kernel", "target", "size", "last use", "hits", "key"],
          right={2, 4})
    print(f"{len(rows)} entries, {human_bytes(sum(r['size'] for r in rows))}")
    return 0


# ---- stats -------------------------------------------------------------------------------------

def tier_stats(args) -> dict:
    """Writable cache, read-only directories and remote tier, as plain data (also for info)."""
    from .. import settings
    from ..cache.aot import ReadOnlyCache

    d = cache_dir(args)
    disk = open_disk(args, write=False)
    rows = _entries(disk) if disk else []
    per = {}
    for r in rows:
        g = per.setdefault((r["family"], r["arch"]), {"family": r["family"], "arch": r["arch"],
                                                      "entries": 0, "bytes": 0, "hits": 0})
        g["entries"] += 1
        g["bytes"] += r["size"]
        g["hits"] += r["hits"]
    out = {
        "cache_dir": str(d), "exists": disk is not None, "entries": len(rows),
        "bytes": sum(r["size"] for r in rows),
        "volume": disk.volume() if disk else 0, "writable": hasattr(disk, "put"),
        "size_limit": settings.size_limit(), "hits": sum(r["hits"] for r in rows),
        "oldest_use": min((r["used"] for r in rows), default=None),
        "newest_use": max((r["used"] for r in rows), default=None),
        "by_family": sorted(per.values(), key=lambda g: (g["family"], g["arch"])),
        "read_only": [],
        "remote": remote_status(),
    }
    for p in settings.aot_dirs():
        ro = ReadOnlyCache(p)
        out["read_only"].append({"path": str(p), "available": ro.available,
                                 "entries": len(ro.keys()) if ro.available else 0})
    return out


def remote_status() -> dict:
    """The remote tier's ``describe()`` when one is configured ({"configured": False} if not)."""
    import os

    from ..service import SERVICE

    if not os.environ.get("JITKERN_REMOTE_CACHE"):
        return {"configured": False}
    try:
        tier = SERVICE.remote_tier()
    except Exception as e:
        return {"configured": True, "state": "error", "error": f"{type(e).__name__}: {e}"}
    if tier is None:
        return {"configured": True, "state": "unavailable"}
    describe = getattr(tier, "describe", None)
    if not callable(describe):
        return {"configured": True, "state": "configured"}
    try:  # ask the server too (bounded by the tier's own timeout): a state, not a guess
        d = dict(describe(probe=True))
    except TypeError:
        d = dict(describe())
    d.setdefault("configured", True)
    return d


def print_remote(r: dict) -> None:
    if not r.get("configured"):
        print("remote: not configured (JITKERN_REMOTE_CACHE unset)")
        return
    print(f"remote: {r.get('url', '')} state={r.get('state')}")
    for k, v in r.items():
        if k not in ("configured", "url", "state"):
            print(f"  {k}: {v}")


def cmd_stats(args) -> int:
    s = tier_stats(args)
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"cache: {s['cache_dir']}" + ("" if s["exists"] else " (empty: nothing cached yet)"))
    print(f"  {s['entries']} entries, {human_bytes(s['bytes'])} of cubins, "
          f"{human_bytes(s['volume'])} on disk, limit {human_bytes(s['size_limit'])}, "
          f"{s['hits']} disk hits")
    if s["by_family"]:
        table([[g["family"], g["arch"], g["entries"], human_bytes(g["bytes"]), g["hits"]]
               for g in s["by_family"]], ["family", "target", "entries", "bytes", "hits"],
              right={2, 3, 4})
    for ro in s["read_only"]:
        state = f"{ro['entries']} entries" if ro["available"] else "not available"
        print(f"read-only: {ro['path']} ({state})")
    print_remote(s["remote"])
    return 0


# ---- verify ------------------------------------------------------------------------------------

def _load_tester():
    """A function that loads an entry's cubin on GPU 0 (CuPy), or None without a GPU."""
    from .common import local_capability

    cap = local_capability()
    if cap is None:
        return None, None

    def load(entry) -> None:  # as the service loads it (jitkern.launch): module, then functions
        import cupy

        with cupy.cuda.Device(0):
            m = cupy.cuda.function.Module()
            m.load(entry.cubin)
            for sym in entry.lowered_names.values():
                m.get_function(sym)

    return load, cap


def cmd_verify(args) -> int:
    from .. import toolchain
    from ..entry import CacheEntry
    from ..errors import CorruptEntry

    disk = open_disk(args, write=not args.keep)
    report = {"cache_dir": str(cache_dir(args)), "checked": 0, "bad": 0, "dropped": 0,
              "orphan_files": 0, "stale": 0, "load_tested": 0, "bad_entries": []}
    if disk is None:
        _verify_out(args, report)
        return 0
    load, cap = (None, None) if args.no_load else _load_tester()
    current = CurrentKeys()
    for row in disk.rows():
        report["checked"] += 1
        blob = disk.peek(row["key"])
        problem = None
        entry = None
        if blob is None:
            problem = "value missing (index row without its file)"
        else:
            try:
                entry = CacheEntry.from_bytes(blob, expect_key=row["key"])
            except CorruptEntry as e:
                problem = str(e)
        if entry is not None and load is not None and \
                toolchain.arch_number(entry.arch) == cap[0] * 10 + cap[1]:
            try:
                load(entry)
                report["load_tested"] += 1
            except Exception as e:
                problem = f"does not load on this GPU: {e}"
        if entry is not None and problem is None and not current.is_current(entry.metadata()):
            report["stale"] += 1
        if problem is not None:
            report["bad"] += 1
            meta = read_metadata(disk, row) or {}
            report["bad_entries"].append({"key": row["key"], "name": meta.get("name"),
                                          "problem": problem})
            if not args.keep:
                disk.delete(row["key"])
                report["dropped"] += 1
    orphans = disk.orphan_files() if hasattr(disk, "orphan_files") else []  # read-only: none
    report["orphan_files"] = len(orphans)
    if not args.keep:
        for p in orphans:
            try:
                p.unlink()
            except OSError:
                pass
    _verify_out(args, report)
    return 1 if report["bad"] else 0


def _verify_out(args, r: dict) -> None:
    if args.json:
        print(json.dumps(r))
        return
    for b in r["bad_entries"]:
        print(f"BAD {b['name'] or '?'} [{b['key'][:12]}]: {b['problem']}"
              + ("" if args.keep else " (dropped)"))
    dropped = "" if args.keep else f" ({r['dropped']} dropped)"
    removed = "" if args.keep else " removed"
    print(f"checked {r['checked']} entries in {r['cache_dir']}: {r['bad']} bad{dropped}, "
          f"{r['load_tested']} load-tested on the GPU, {r['stale']} stale (never used by this "
          f"installation: `jitkern cache prune --stale`), {r['orphan_files']} orphan file(s)"
          f"{removed}")


# ---- prune -------------------------------------------------------------------------------------

def cmd_prune(args) -> int:
    from .. import settings

    if not (args.max_size or args.older_than or args.stale):
        raise CliError("prune needs a bound: --max-size SIZE, --older-than AGE and/or --stale")
    try:
        max_size = settings.parse_size(args.max_size) if args.max_size else None
    except ValueError as e:
        raise CliError(f"--max-size: {e}") from None
    try:
        max_age = parse_duration(args.older_than) if args.older_than else None
    except ValueError as e:
        raise CliError(f"--older-than: {e}") from None
    disk = open_disk(args, write=not args.dry_run)
    rows = _entries(disk) if disk else []
    drop: dict = {}
    if args.stale:
        current = CurrentKeys()
        for r in rows:
            meta = {"key": r["key"], "family": r["family"], "config": r["config"], "arch": r["arch"]}
            if not current.is_current(meta):
                drop[r["key"]] = (r, "stale")
    if max_age is not None:
        cutoff = time.time() - max_age
        for r in rows:
            if r["used"] < cutoff and r["key"] not in drop:
                drop[r["key"]] = (r, f"unused since {ago(r['used'])}")
    if max_size is not None:
        kept = sorted((r for r in rows if r["key"] not in drop), key=lambda r: r["used"])
        total = sum(r["size"] for r in kept)
        for r in kept:  # least recently used first
            if total <= max_size:
                break
            drop[r["key"]] = (r, "over --max-size (least recently used)")
            total -= r["size"]
    if not args.dry_run:
        for key in drop:
            disk.delete(key)
    freed = sum(r["size"] for r, _ in drop.values())
    kept_bytes = sum(r["size"] for r in rows) - freed
    if args.json:
        print(json.dumps({"dropped": len(drop), "freed_bytes": freed, "kept": len(rows) - len(drop),
                          "kept_bytes": kept_bytes, "dry_run": args.dry_run,
                          "entries": [{"key": k, "name": r["name"], "why": why}
                                      for k, (r, why) in drop.items()]}))
        return 0
    for r, why in drop.values():
        print(f"{'would drop' if args.dry_run else 'dropped'} {r['name']} ({r['arch']}, "
              f"{human_bytes(r['size'])}): {why}")
    print(f"{'would drop' if args.dry_run else 'dropped'} {len(drop)} entries "
          f"({human_bytes(freed)}); {len(rows) - len(drop)} kept ({human_bytes(kept_bytes)})")
    return 0


# ---- clear -------------------------------------------------------------------------------------

def cmd_clear(args) -> int:
    d = cache_dir(args)
    disk = open_disk(args)
    n = len(disk.rows()) if disk else 0
    if disk is None or n == 0:
        print(f"nothing to clear in {d}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(f"refusing to clear {n} entries in {d} without confirmation: stdin is "
                           f"not a terminal; pass --yes")
        answer = input(f"remove all {n} cached kernels in {d}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    disk.clear()
    _remove_idle_locks(d / "locks")
    print(f"removed {n} entries from {d}")
    return 0


def _remove_idle_locks(locks) -> None:
    """Delete lock files no process holds (a held one stays: its holder is compiling)."""
    import fcntl
    import os

    if not locks.is_dir():
        return
    for p in locks.glob("*.lock"):
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            p.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)
