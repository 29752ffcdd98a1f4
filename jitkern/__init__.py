"""jitkern: a runtime JIT kernel compiler service for LLM inference.

CUDA sources in ``kernels_src/`` are specialized per configuration, compiled with NVRTC,
cached in memory, on disk (diskcache) and optionally in Redis, and launched on torch tensors.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CompileError, CorruptEntry, JitkernError, ToolchainError  # noqa: E402
from .family import Entry, IntRange, KernelFamily, Param, get_family, register_family, registered  # noqa: E402
from .logging_setup import configure as _configure_logging  # noqa: E402
from .service import compile, get_kernel, key_of  # noqa: E402,A004
from .stats import stats  # noqa: E402

_configure_logging()

__all__ = ["CompileError", "CorruptEntry", "JitkernError", "ToolchainError", "Entry", "IntRange",
           "KernelFamily", "Param", "get_family", "register_family", "registered", "compile",
           "get_kernel", "key_of", "stats", "ops"]


def __getattr__(name):
    if name == "ops":  # importing the ops imports torch: only when asked for
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(name)
