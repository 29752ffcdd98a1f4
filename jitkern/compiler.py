"""NVRTC compilation of one specialization to a cubin."""

from __future__ import annotations

import logging
import re
import time

from . import toolchain
from .entry import CacheEntry
from .errors import CompileError, ToolchainError
from .key import compile_options

log = logging.getLogger("jitkern")

_DIAG = re.compile(r"^(?P<file>[^\s(][^(]*)\((?P<line>\d+)\): (?P<kind>error|catastrophic error)", re.MULTILINE)


def compile_spec(spec, arch: str, closure, key: str) -> CacheEntry:
    """Compile ``spec`` for ``arch`` with NVRTC; returns a CacheEntry, raises CompileError."""
    nv = toolchain.nvrtc()
    loaded = "{}.{}".format(*nv.getVersion())
    if loaded != toolchain.nvrtc_version():  # the key named another NVRTC than the one loaded
        raise ToolchainError(f"the loaded NVRTC is {loaded} but the cache key was computed for "
                             f"{toolchain.nvrtc_version()} (two NVRTC installations?); "
                             "uninstall one or set CUDA_HOME consistently")
    toolchain.check_supported(arch)
    options = compile_options(spec, arch)
    full = options + [f"-I{toolchain.cuda_include_dir()}"]
    names = [n.encode() for n, _ in closure.headers]
    texts = [t.encode() for _, t in closure.headers]
    t0 = time.perf_counter()
    prog = nv.createProgram(closure.main_text, closure.main_name, texts, names)
    try:
        for _, expr in spec.name_expressions:
            nv.addNameExpression(prog, expr)
        try:
            nv.compileProgram(prog, full)
        except nv.NVRTCError:
            text = nv.getProgramLog(prog)
            raise CompileError(spec.family.name, spec.name, spec.config_dict, arch, text,
                               _excerpts(text, closure)) from None
        lowered = {k: nv.getLoweredName(prog, expr) for k, expr in spec.name_expressions}
        cubin = nv.getCUBIN(prog)
    finally:
        nv.destroyProgram(prog)
    seconds = time.perf_counter() - t0
    return CacheEntry(key=key, family=spec.family.name, name=spec.name, config=spec.config_dict,
                      arch=arch, nvrtc_version=toolchain.nvrtc_version(), options=options,
                      lowered_names=lowered, compile_seconds=round(seconds, 4), cubin=bytes(cubin))


def _excerpts(log_text: str, closure, context: int = 2) -> str:
    files = dict(closure.headers)
    files[closure.main_name] = closure.main_text
    out = []
    for m in _DIAG.finditer(log_text):
        text = files.get(m.group("file"))
        if text is None:
            continue
        lines = text.splitlines()
        n = int(m.group("line"))
        lo, hi = max(1, n - context), min(len(lines), n + context)
        out.append(f"{m.group('file')}:{n}")
        for i in range(lo, hi + 1):
            out.append(f"{'>' if i == n else ' '} {i:5d} | {lines[i - 1]}")
    return "\n".join(out)
