"""The path of one call: specialize -> key -> memory -> disk -> remote -> compile -> load.

``get_kernel`` is the hot path: one dict lookup when the kernel is loaded on that device. On a
miss it builds the specialization and its key (once per configuration per process), then
``_entry_for`` walks the tiers with in-process and cross-process single flight.
"""

from __future__ import annotations

import logging
import threading

from . import settings, sources, toolchain
from .cache.aot import ReadOnlyCache
from .cache.disk import DiskTier
from .cache.lock import key_lock, lock_dir
from .compiler import compile_spec
from .entry import CacheEntry
from .errors import CompileError, CorruptEntry
from .key import cache_key
from .stats import COUNTERS

log = logging.getLogger("jitkern")


class _Flight:
    __slots__ = ("event", "result", "error")

    def __init__(self):
        self.event = threading.Event()
        self.result = None
        self.error = None


class KernelService:
    """Process-wide state: loaded kernels, cached entries, the tiers. Use the module functions."""

    def __init__(self):
        self._loaded: dict = {}        # (family name, config items, device) -> LoadedKernel
        self._entries: dict = {}       # key -> CacheEntry (cubins compiled or read this process)
        self._closures: dict = {}      # family name -> sources.Closure
        self._keys: dict = {}          # (family name, canonical config, arch) -> key
        self._flights: dict = {}
        self._lock = threading.RLock()
        self._disk: DiskTier | None = None
        self._aot: list | None = None
        self.remote = None             # set by jitkern.cache.remote when JITKERN_REMOTE_CACHE is set
        self._remote_checked = False

    # --- tiers, opened lazily so environment changes before first use are honoured
    @property
    def disk(self) -> DiskTier:
        if self._disk is None:
            with self._lock:
                if self._disk is None:
                    self._disk = DiskTier(settings.cache_dir(), settings.size_limit())
        return self._disk

    @property
    def aot(self) -> list:
        if self._aot is None:
            with self._lock:
                if self._aot is None:
                    dirs = [ReadOnlyCache(d) for d in settings.aot_dirs()]
                    if not self.disk.writable:  # a read-only cache dir still serves what it holds
                        dirs.append(ReadOnlyCache(self.disk.directory))
                    self._aot = [d for d in dirs if d.available]
        return self._aot

    def remote_tier(self):
        if not self._remote_checked:
            with self._lock:
                if not self._remote_checked:
                    try:
                        from .cache import remote
                    except ImportError:
                        remote = None
                    if remote is not None:
                        self.remote = remote.from_env()
                    self._remote_checked = True
        return self.remote

    # --- keys
    def closure(self, family) -> sources.Closure:
        c = self._closures.get(family.name)
        if c is None:
            c = sources.read_closure(family.root, family.source)
            self._closures[family.name] = c
        return c

    def key_for(self, spec, arch: str) -> str:
        k = (spec.family.name, spec.config, arch)
        key = self._keys.get(k)
        if key is None:
            key = cache_key(spec, arch, self.closure(spec.family))
            self._keys[k] = key
        return key

    # --- entries: memory -> AOT -> disk -> remote -> compile
    def entry(self, spec, arch: str) -> CacheEntry:
        key = self.key_for(spec, arch)
        e = self._entries.get(key)
        if e is not None:
            COUNTERS.add("memory_hits")
            return e
        with self._lock:
            flight = self._flights.get(key)
            owner = flight is None
            if owner:
                flight = self._flights[key] = _Flight()
        if not owner:  # another thread of this process is on it
            flight.event.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            e = self._entry_from_tiers(spec, arch, key)
            self._entries[key] = e
            flight.result = e
            return e
        except BaseException as err:
            flight.error = err
            raise
        finally:
            flight.event.set()
            with self._lock:
                self._flights.pop(key, None)

    def _read(self, source, key: str, where: str, drop=None) -> CacheEntry | None:
        blob = source.get(key)
        if blob is None:
            return None
        try:
            return CacheEntry.from_bytes(blob, expect_key=key)
        except CorruptEntry as err:
            COUNTERS.add("corrupt_entries")
            COUNTERS.add("errors")
            log.warning("jitkern: corrupt %s cache entry %s dropped (%s); it will be recompiled",
                        where, key[:16], err)
            if drop is not None:
                drop(key)
            return None

    def _from_caches(self, key: str) -> CacheEntry | None:
        for ro in self.aot:
            e = self._read(ro, key, f"read-only ({ro.directory})")
            if e is not None:
                COUNTERS.add("aot_hits")
                COUNTERS.add("disk_hits")
                return e
        e = self._read(self.disk, key, "disk", drop=self.disk.delete)
        if e is not None:
            COUNTERS.add("disk_hits")
        return e

    def _entry_from_tiers(self, spec, arch: str, key: str) -> CacheEntry:
        e = self._from_caches(key)
        if e is not None:
            return e
        remote = self.remote_tier()
        if remote is not None:
            e = remote.get(key)
            if e is not None:
                COUNTERS.add("remote_hits")
                self._store_disk(e)
                return e
        COUNTERS.add("misses")
        ldir = lock_dir(self.disk.directory, self.disk.writable)
        with key_lock(ldir, key, settings.lock_timeout(),
                      on_wait=lambda: COUNTERS.add("lock_waits")) as got:
            if not got:
                COUNTERS.add("lock_timeouts")
                log.warning("jitkern: waited %.0f s for another process compiling %s; compiling here",
                            settings.lock_timeout(), spec.name)
            else:  # whoever held the lock may have stored it meanwhile
                e = self._from_caches(key)
                if e is not None:
                    return e
            e = self._compile(spec, arch, key)
            self._store_disk(e)
        if remote is not None:
            remote.put(e)
        return e

    def _compile(self, spec, arch: str, key: str) -> CacheEntry:
        try:
            e = compile_spec(spec, arch, self.closure(spec.family), key)
        except CompileError:
            COUNTERS.add("compile_errors")
            COUNTERS.add("errors")
            raise
        COUNTERS.add("compiles")
        COUNTERS.add("compile_seconds", e.compile_seconds)
        log.info("jitkern: compiled %s for %s in %.2f s", spec.name, arch, e.compile_seconds)
        return e

    def _store_disk(self, e: CacheEntry) -> None:
        if self.disk.put(e.key, e.to_bytes()):
            COUNTERS.add("disk_writes")
        elif self.disk.writable:
            COUNTERS.add("disk_write_errors")
            COUNTERS.add("errors")

    def drop(self, key: str) -> None:
        """Forget ``key`` in this process and on disk (an entry that would not load)."""
        self._entries.pop(key, None)
        self.disk.delete(key)

    # --- loading
    def load(self, family, config, device_index: int):
        """Load ``family`` at ``config`` on ``device_index`` (one module per specialization and
        device). A cached cubin that fails to load is dropped and recompiled once."""
        from .launch import LoadedKernel

        spec = family.specialize(config)
        arch = toolchain.resolve_arch(family, capability=_capability(device_index))
        k = (family.name, spec.config, device_index)
        kern = self._loaded.get(k)
        if kern is not None:
            return kern
        e = self.entry(spec, arch)
        try:
            kern = LoadedKernel(e, spec, device_index)
        except Exception as err:
            if not _is_cuda_error(err):
                raise
            COUNTERS.add("load_errors")
            COUNTERS.add("errors")
            log.warning("jitkern: cached %s did not load on cuda:%d (%s); recompiling",
                        spec.name, device_index, err)
            self.drop(e.key)
            e = self._compile(spec, arch, e.key)
            self._entries[e.key] = e
            self._store_disk(e)
            kern = LoadedKernel(e, spec, device_index)
        COUNTERS.add("loads")
        self._loaded[k] = kern
        return kern


def _is_cuda_error(err: Exception) -> bool:
    return type(err).__name__ in ("CUDADriverError", "CUDARuntimeError")


_CAPS: dict = {}


def _capability(index: int) -> tuple:
    cap = _CAPS.get(index)
    if cap is None:
        import torch

        cap = _CAPS[index] = torch.cuda.get_device_capability(index)
    return cap


SERVICE = KernelService()


def get_kernel(family, config, device=None):
    """The loaded kernel of ``family`` at ``config`` on ``device`` (torch.device, index or None
    for the current device). Memory hit: one dict lookup. Raises ValueError for a configuration
    outside the family's allowed values, CompileError if NVRTC rejects it."""
    if device is None or isinstance(device, int):
        index = _current_index() if device is None else device
    else:
        index = device.index if device.index is not None else _current_index()
    items = tuple(config.items()) if isinstance(config, dict) else tuple(config)
    k = (family.name, items, index)
    kern = SERVICE._loaded.get(k)
    if kern is not None:
        COUNTERS.memory_hits += 1
        return kern
    kern = SERVICE.load(family, dict(items), index)
    SERVICE._loaded[k] = kern
    return kern


def _current_index() -> int:
    import torch

    return torch.cuda.current_device()


def compile(family, config, arch: str | None = None) -> CacheEntry:  # noqa: A001
    """Compile (or fetch from the cache tiers) ``family`` at ``config`` for ``arch`` without
    loading it: works without a GPU. ``arch`` defaults to $JITKERN_ARCH, else the current GPU."""
    spec = family.specialize(config)
    cap = None
    if not arch and not settings.arch_override():
        cap = _local_capability()
    target = toolchain.resolve_arch(family, arch, capability=cap)
    return SERVICE.entry(spec, target)


def _local_capability():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_capability()
    except ImportError:
        pass
    return None


def key_of(family, config, arch: str) -> str:
    """The cache key of ``family`` at ``config`` for ``arch`` (hex SHA-256)."""
    spec = family.specialize(config)
    return SERVICE.key_for(spec, toolchain.resolve_arch(family, arch))
