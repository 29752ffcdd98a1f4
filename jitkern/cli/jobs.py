"""The warm-up job list: which (family, configuration, target) to have in the cache, and which of
them are there already.

Sources: the built-in set (every registered family's ``warmup`` configurations), model presets
and manifests. Every configuration is checked against its family (``canonical``) while the list
is built, so a bad one is an error before anything compiles. Duplicates collapse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import CliError, family_target


@dataclass
class Job:
    family: object                   # KernelFamily
    config: dict
    target: str                      # exact NVRTC target, e.g. sm_90a
    source: str                      # where it came from: "default", "preset:NAME", a manifest path
    name: str = ""                   # readable name (family/param=value,...)
    key: str = ""
    status: str = "pending"          # pending -> cached | compiled | failed
    seconds: float = 0.0             # compile seconds (NVRTC) for compiled jobs
    bytes: int = 0                   # cubin bytes
    error: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"family": self.family.name, "name": self.name, "config": self.config,
             "arch": self.target, "key": self.key, "status": self.status, "source": self.source,
             "bytes": self.bytes, "compile_seconds": round(self.seconds, 4)}
        if self.error:
            d["error"] = self.error
        return d


def families_by_name(only: list | None = None) -> dict:
    from ..family import registered

    fams = {f.name: f for f in registered()}
    if only:
        unknown = [n for n in only if n not in fams]
        if unknown:
            raise CliError(f"--family: unknown family {unknown[0]!r}; registered: "
                           f"{', '.join(sorted(fams))}")
        fams = {n: fams[n] for n in only}
    return fams


def default_items(families: dict) -> list:
    return [(f.name, cfg, "default") for f in families.values() for cfg in f.warmup_configs()]


def preset_items(names: list, tp: int | None, families: dict) -> list:
    from ..presets import get_preset

    out = []
    for name in names:
        try:
            preset = get_preset(name)
            configs = preset.configs(tp)
        except ValueError as e:
            raise CliError(str(e)) from None
        for fam, cfg in configs:
            if fam not in families:
                # a preset names a family this installation (or --family) leaves out
                continue
            out.append((fam, cfg, f"preset:{name}"))
    return out


def build(items: list, families: dict, archs: list, exact: bool) -> list:
    """Jobs for every item and target, validated, de-duplicated, keyed."""
    from ..service import SERVICE

    jobs, seen = [], set()
    for fam_name, cfg, source in items:
        fam = families[fam_name]
        try:
            spec = fam.specialize(cfg)
        except ValueError as e:
            raise CliError(f"{source}: {e}") from None
        for arch in archs:
            target = family_target(fam, arch, exact)
            k = (fam.name, spec.config, target)
            if k in seen:
                continue
            seen.add(k)
            jobs.append(Job(fam, dict(spec.config), target, source, name=spec.name,
                            key=SERVICE.key_for(spec, target)))
    return jobs


def mark_cached(jobs: list, touch: bool) -> int:
    """Set status 'cached' on jobs whose entry is in a cache tier and passes its checks.

    ``touch``: a read that counts as a use for the LRU order (not for hit counts). A damaged
    entry is dropped from the writable cache (it will be compiled again). Returns how many
    damaged entries were dropped."""
    from ..entry import CacheEntry
    from ..errors import CorruptEntry
    from ..service import SERVICE

    disk = SERVICE.disk
    readers = list(SERVICE.aot)
    dropped = 0
    for job in jobs:
        blob = None
        for ro in readers:
            blob = ro.get(job.key)
            if blob is not None:
                break
        from_disk = blob is None
        if from_disk:
            blob = disk.get(job.key, count_hit=False) if touch else disk.peek(job.key)
        if blob is None:
            continue
        try:
            e = CacheEntry.from_bytes(blob, expect_key=job.key)
        except CorruptEntry:
            if from_disk and touch:
                disk.delete(job.key)
                dropped += 1
            continue
        job.status = "cached"
        job.bytes = e.size
    return dropped
