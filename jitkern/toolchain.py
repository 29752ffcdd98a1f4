"""NVRTC and the CUDA headers: finding them, versioning them, and resolving the target arch."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

from .errors import ToolchainError
from .sources import INCLUDE

_HEADER_PROBE = "cuda_fp16.h"


@functools.lru_cache(maxsize=None)
def nvrtc():
    """CuPy's NVRTC binding (loads libnvrtc from the nvidia-cuda-nvrtc wheel or the system)."""
    try:
        from cupy_backends.cuda.libs import nvrtc as mod
        mod.getVersion()
    except Exception as e:  # ImportError, or the library not loading
        raise ToolchainError(f"NVRTC is not available through CuPy: {e}. Install cupy-cuda13x and "
                             "nvidia-cuda-nvrtc (pip install 'nvidia-cuda-nvrtc==13.*').") from None
    return mod


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    """'13.0'-style NVRTC version. Remembered per library file (path, size, mtime) in the
    toolchain memo, so a process that only reads the cache never loads libnvrtc."""
    lib = _nvrtc_library_file()
    memo_key = None
    if lib is not None:
        wheel = _wheel_nvrtc_version(lib)
        if wheel is not None:
            return wheel
        st = lib.stat()
        memo_key = f"nvrtc:{lib}:{st.st_size}:{st.st_mtime_ns}"
        cached = _MEMO.get(memo_key)
        if isinstance(cached, str):
            return cached
    major, minor = nvrtc().getVersion()
    version = f"{major}.{minor}"
    if memo_key is not None:
        _MEMO.put(memo_key, version)
    return version


def _wheel_nvrtc_version(lib: Path) -> str | None:
    """major.minor of the nvidia-cuda-nvrtc wheel that ships ``lib``, from its package metadata
    (no library load): a brand-new node computes keys without loading libnvrtc."""
    import importlib.metadata as md

    for dist in ("nvidia-cuda-nvrtc", f"nvidia-cuda-nvrtc-cu{lib.name.rsplit('.', 1)[-1]}"):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            continue
        parts = version.split(".")
        # the wheel must be the one whose soname this is (libnvrtc.so.<major>)
        if len(parts) >= 2 and lib.name.endswith(f".so.{parts[0]}"):
            return f"{parts[0]}.{parts[1]}"
    return None


def _nvrtc_library_file() -> Path | None:
    """The libnvrtc of the nvidia-cuda-nvrtc wheel, which CuPy loads first, if installed."""
    for inc in _wheel_include_dirs():
        for lib in sorted((inc.parent / "lib").glob("libnvrtc.so.*")):
            return lib
    return None


@functools.lru_cache(maxsize=None)
def supported_archs() -> tuple:
    return tuple(int(a) for a in nvrtc().getSupportedArchs())


def _wheel_include_dirs() -> list[Path]:
    out = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            base = Path(base)
            # CUDA 13 wheels put everything under nvidia/cu13; CUDA 12 wheels per component
            out += sorted(base.glob("cu1*/include")) + [base / "cuda_runtime" / "include"]
    return out


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> Path:
    """Headers from the nvidia-cuda-runtime wheel, else $CUDA_HOME, $CUDA_PATH, /usr/local/cuda."""
    cands = _wheel_include_dirs()
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    cands.append(Path("/usr/local/cuda/include"))
    for c in cands:
        if (c / _HEADER_PROBE).is_file():
            return c
    raise ToolchainError("CUDA headers (cuda_fp16.h) not found: install the nvidia-cuda-runtime "
                         "wheel (pip install 'nvidia-cuda-runtime==13.*') or set CUDA_HOME")


@functools.lru_cache(maxsize=None)
def header_digest(names: tuple) -> str:
    """SHA-256 over the CUDA headers reachable from ``names`` (their relative names and bytes).

    Names that resolve to no file (NVRTC's built-in headers, e.g. <cstdint>) enter by name.
    The digest is remembered in the toolchain memo with each file's size and mtime, and reused
    while none of them changed (what make and ccache do), sparing each new process the reads."""
    inc = cuda_include_dir()
    memo_key = f"headers:{inc}:{','.join(names)}"
    cached = _MEMO.get(memo_key)
    if isinstance(cached, dict) and _stamps_match(inc, cached.get("files", {})):
        return cached["digest"]
    digest, files = _header_digest(inc, names)
    _MEMO.put(memo_key, {"digest": digest, "files": files})
    return digest


def _stamp(path: Path):
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def _stamps_match(inc: Path, files: dict) -> bool:
    return bool(files) and all(_stamp(inc / name) == stamp for name, stamp in files.items())


def _header_digest(inc: Path, names: tuple):
    seen: dict[str, bytes | None] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = inc / name
        if not path.is_file():
            seen[name] = None
            continue
        data = path.read_bytes()
        seen[name] = data
        parent = Path(name).parent
        for _, inc_name in INCLUDE.findall(data.decode("latin-1")):
            rel = (parent / inc_name).as_posix()
            todo.append(rel if (inc / rel).is_file() else inc_name)
    h = hashlib.sha256()
    for name in sorted(seen):
        data = seen[name]
        h.update(f"{name}\0{-1 if data is None else len(data)}\0".encode())
        if data:
            h.update(data)
    return h.hexdigest(), {name: _stamp(inc / name) for name in sorted(seen)}


class _Memo:
    """A small JSON file beside the cache (toolchain.json): facts about the toolchain that are
    slow to establish and keyed by what they depend on. Best effort: unreadable or unwritable
    means recompute."""

    def __init__(self):
        self._data = None

    def _path(self) -> Path:
        from . import settings

        return settings.cache_dir() / "toolchain.json"

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self._path().read_text())
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, key: str):
        return self._load().get(key)

    def put(self, key: str, value) -> None:
        data = self._load()
        data[key] = value
        path = self._path()
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".toolchain.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError:
            pass


_MEMO = _Memo()


_ARCH = re.compile(r"^(?:sm_?|compute_)?(\d)\.?(\d{1,2})([af]?)$")


def normalize_arch(arch: str) -> str:
    """'sm_90a', 'sm90', '9.0', '90' -> 'sm_90a' / 'sm_90'. ValueError for anything else."""
    m = _ARCH.match(str(arch).strip().lower())
    if not m:
        raise ValueError(f"target {arch!r} is not an SM architecture; expected e.g. sm_90, sm_90a, sm_100a")
    return f"sm_{m.group(1)}{m.group(2)}{m.group(3)}"


def arch_number(arch: str) -> int:
    return int(re.sub(r"\D", "", arch))


def check_supported(arch: str) -> None:
    if arch_number(arch) not in supported_archs():
        raise ToolchainError(f"NVRTC {nvrtc_version()} cannot target {arch}; it supports "
                             + ", ".join(f"sm_{a}" for a in supported_archs()))


def resolve_arch(family, arch: str | None = None, capability: tuple | None = None) -> str:
    """The exact target: ``arch`` argument, else $JITKERN_ARCH, else the device's capability.

    Families that use arch-specific instructions (wgmma) get the 'a' suffix on sm_90 and newer."""
    from . import settings

    chosen = arch or settings.arch_override()
    if chosen:
        target = normalize_arch(chosen)
    elif capability is not None:
        target = f"sm_{capability[0]}{capability[1]}"
    else:
        raise ToolchainError("no target architecture: there is no GPU here; pass arch= (or --arch), "
                             "or set JITKERN_ARCH, e.g. sm_90a")
    if family is not None and family.arch_specific and arch_number(target) >= 90 \
            and not target.endswith(("a", "f")):
        target += "a"
    return target
