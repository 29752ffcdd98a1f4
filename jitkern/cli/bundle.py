"""Portable cache bundles: ``jitkern cache export FILE`` / ``jitkern cache import FILE``.

A bundle is a gzip'd tar file: ``entries/<key>.jkc`` (each a serialized cache entry, with its
own cubin SHA-256 inside) and ``jitkern-bundle.json``: format version, NVRTC version(s),
targets, and per entry its key, readable name, configuration, the SHA-256 of its file and the
key inputs (the exact dict whose hash is the key: family, configuration, source and header
digests, NVRTC version, target, options), so an importer can check that a key really stands for
what the entry says, and whether this installation would ever look it up.

Import verifies everything before writing anything: a damaged bundle is refused outright; one
built with another NVRTC, or for no GPU of the requested targets, is refused unless ``--force``.
Member names are checked against the manifest (nothing is extracted to the filesystem).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

from .common import CliError, human_bytes, local_capability
from .store import CurrentKeys, cache_dir, key_of_inputs, open_disk

FORMAT = "jitkern-bundle"
VERSION = 1
MANIFEST = "jitkern-bundle.json"
_MEMBER = re.compile(r"^entries/[0-9a-f]{64}\.jkc$")


def cmd_export(args) -> int:
    from .. import __version__, toolchain
    from ..entry import CacheEntry
    from ..errors import CorruptEntry

    disk = open_disk(args, write=False)
    if disk is None:
        raise CliError(f"nothing to export: no cache at {cache_dir(args)}")
    archs = None
    if args.arch:
        try:
            archs = {toolchain.normalize_arch(a) for a in args.arch}
        except ValueError as e:
            raise CliError(f"--arch: {e}") from None
    current = CurrentKeys()
    out = Path(args.file)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    entries, skipped = [], 0
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for row in sorted(disk.rows(), key=lambda r: r["key"]):
                blob = disk.peek(row["key"])
                try:
                    e = CacheEntry.from_bytes(blob or b"", expect_key=row["key"])
                except CorruptEntry as err:
                    print(f"jitkern cache export: skipping damaged entry {row['key'][:12]}: {err}",
                          file=sys.stderr)
                    skipped += 1
                    continue
                if (args.family and e.family not in args.family) or (archs and e.arch not in archs):
                    continue
                inputs = current.key_inputs(e.metadata())
                if inputs is not None and key_of_inputs(inputs) != e.key:
                    inputs = None  # built from other sources than this installation's: unknown
                name = f"entries/{e.key}.jkc"
                _add(tar, name, blob)
                entries.append({"key": e.key, "file": name, "sha256": hashlib.sha256(blob).hexdigest(),
                                "bytes": len(blob), "name": e.name, "family": e.family,
                                "config": e.config, "arch": e.arch, "nvrtc_version": e.nvrtc_version,
                                "cubin_sha256": e.cubin_sha256, "key_inputs": inputs})
            manifest = {"format": FORMAT, "version": VERSION, "created": time.time(),
                        "jitkern": __version__,
                        "nvrtc": sorted({e["nvrtc_version"] for e in entries}),
                        "targets": sorted({e["arch"] for e in entries}), "entries": entries}
            _add(tar, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        os.replace(tmp, out)  # a reader never sees half a bundle
    finally:
        if tmp.exists():
            tmp.unlink()
    summary = {"file": str(out), "entries": len(entries), "skipped_damaged": skipped,
               "bytes": out.stat().st_size, "targets": manifest["targets"], "nvrtc": manifest["nvrtc"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {len(entries)} entries ({', '.join(summary['targets']) or 'none'}; NVRTC "
              f"{', '.join(summary['nvrtc']) or '-'}) to {out} ({human_bytes(summary['bytes'])})")
    return 0


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _read_bundle(path: Path):
    """(manifest, {member name: bytes}) after checking every entry; CliError on any damage."""
    from ..entry import CacheEntry
    from ..errors import CorruptEntry

    try:
        tar = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise CliError(f"no such bundle: {path}") from None
    except (tarfile.TarError, OSError) as e:
        raise CliError(f"{path} is not a jitkern bundle (not a readable tar file: {e})") from None
    problems, blobs = [], {}
    with tar:
        try:
            manifest = json.load(tar.extractfile(MANIFEST))
        except (KeyError, ValueError, tarfile.TarError, OSError) as e:
            raise CliError(f"{path} is not a jitkern bundle (no readable {MANIFEST}: {e})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CliError(f"{path}: bundle format {manifest.get('format')!r} version "
                           f"{manifest.get('version')!r}; this jitkern reads {FORMAT} version {VERSION}")
        for e in manifest.get("entries", []):
            where = f"{e.get('name') or e.get('key', '?')}"
            name = e.get("file", "")
            if not _MEMBER.match(name) or name != f"entries/{e.get('key')}.jkc":
                problems.append(f"{where}: unexpected member name {name!r}")
                continue
            try:
                data = tar.extractfile(name).read()
            except (KeyError, AttributeError, tarfile.TarError, OSError):
                problems.append(f"{where}: {name} missing from the bundle")
                continue
            if hashlib.sha256(data).hexdigest() != e.get("sha256"):
                problems.append(f"{where}: file checksum mismatch")
                continue
            try:
                entry = CacheEntry.from_bytes(data, expect_key=e["key"])
            except CorruptEntry as err:
                problems.append(f"{where}: {err}")
                continue
            inputs = e.get("key_inputs")
            if inputs is not None and (key_of_inputs(inputs) != entry.key
                                       or inputs.get("arch") != entry.arch
                                       or inputs.get("nvrtc") != entry.nvrtc_version):
                problems.append(f"{where}: key inputs do not hash to the entry's key")
                continue
            if entry.arch != e.get("arch") or entry.nvrtc_version != e.get("nvrtc_version"):
                problems.append(f"{where}: manifest and entry disagree on target or NVRTC")
                continue
            blobs[name] = data
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CliError(f"{path}: refusing a damaged bundle, nothing imported:\n  {shown}{more}",
                       code=1)
    return manifest, blobs


def cmd_import(args) -> int:
    from .. import toolchain

    path = Path(args.file)
    manifest, blobs = _read_bundle(path)
    entries = manifest.get("entries", [])
    local_nvrtc = toolchain.nvrtc_version()
    refusals = []
    other_nvrtc = sorted({e["nvrtc_version"] for e in entries} - {local_nvrtc})
    if other_nvrtc:
        refusals.append(f"built with NVRTC {', '.join(other_nvrtc)} but this machine has NVRTC "
                        f"{local_nvrtc}: the cache key includes the NVRTC version, so those "
                        f"entries would never be used. Rebuild the bundle with NVRTC {local_nvrtc}")
    if args.arch:
        try:
            wanted = [toolchain.normalize_arch(a) for a in args.arch]
        except ValueError as e:
            raise CliError(f"--arch: {e}") from None
    else:
        cap = local_capability()
        wanted = [f"sm_{cap[0]}{cap[1]}"] if cap else []
    numbers = {toolchain.arch_number(a) for a in wanted}
    matching = [e for e in entries if toolchain.arch_number(e["arch"]) in numbers]
    if wanted and entries and not matching:
        refusals.append(f"its targets ({', '.join(manifest.get('targets', []))}) do not match "
                        f"{', '.join(wanted)} ({'--arch' if args.arch else 'this GPU'})")
    if refusals and not args.force:
        raise CliError(f"{path}: refusing the bundle: " + "; and ".join(refusals)
                       + ". Pass --force to import it anyway.", code=1)
    current = CurrentKeys()
    unusable = sum(1 for e in entries if e.get("key_inputs") is None
                   or not current.is_current({"key": e["key"], "family": e["family"],
                                              "config": e["config"], "arch": e["arch"]}))
    disk = open_disk(args, create=True)
    imported = present = 0
    for e in entries:
        data = blobs[e["file"]]
        have = disk.peek(e["key"])
        if have is not None and hashlib.sha256(have).digest() == hashlib.sha256(data).digest():
            present += 1
            continue
        if not disk.put(e["key"], data):
            raise CliError(f"could not write to the cache at {disk.directory}", code=1)
        imported += 1
    summary = {"file": str(path), "entries": len(entries), "imported": imported,
               "already_present": present, "unusable_here": unusable, "forced": bool(refusals),
               "target_checked": bool(wanted), "cache_dir": str(disk.directory)}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"imported {imported} entries into {disk.directory} ({present} already there)")
    if refusals:
        print("warning (--force): " + "; ".join(refusals), file=sys.stderr)
    if not wanted:
        print("note: no GPU here and no --arch: the bundle's targets "
              f"({', '.join(manifest.get('targets', []))}) were not checked", file=sys.stderr)
    if unusable:
        print(f"note: {unusable} entries were built from kernel sources, headers or options other "
              f"than this installation's and will not be used by it", file=sys.stderr)
    return 0
