"""The cache key: a hash of every input that changes the binary, and nothing machine-specific.

Inputs: cache-format version, family name, canonical configuration, source-closure digest,
NVRTC version, CUDA-header digest, exact target, every compile option (macros and name
expressions included). Never absolute paths, never compiler output.
"""

from __future__ import annotations

import hashlib
import json

from . import sources, toolchain

CACHE_FORMAT = 1


def compile_options(spec, arch: str) -> list[str]:
    """NVRTC options of ``spec`` for ``arch``, without include paths (those are added at compile)."""
    return [f"--gpu-architecture={arch}", *spec.family.options, *spec.defines]


def key_inputs(spec, arch: str, closure: sources.Closure) -> dict:
    return {
        "format": CACHE_FORMAT,
        "family": spec.family.name,
        "config": [[k, v] for k, v in spec.config],
        "sources": closure.digest,
        "nvrtc": toolchain.nvrtc_version(),
        "headers": toolchain.header_digest(closure.system_includes),
        "arch": arch,
        "options": compile_options(spec, arch),
        "entries": [list(e) for e in spec.name_expressions],
    }


def cache_key(spec, arch: str, closure: sources.Closure) -> str:
    blob = json.dumps(key_inputs(spec, arch, closure), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
