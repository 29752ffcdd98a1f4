"""Exceptions raised by jitkern."""

from __future__ import annotations


class JitkernError(Exception):
    """Base class of jitkern's own errors."""


class CompileError(JitkernError):
    """NVRTC rejected a specialization.

    Attributes: ``family`` (name), ``config`` (the canonical configuration), ``arch`` (target),
    ``log`` (the NVRTC log, verbatim) and ``excerpts`` (rendered source lines around each error).
    """

    def __init__(self, family: str, name: str, config: dict, arch: str, log: str, excerpts: str):
        self.family = family
        self.name = name
        self.config = dict(config)
        self.arch = arch
        self.log = log
        self.excerpts = excerpts
        text = f"NVRTC failed to compile {name} for {arch}\nconfiguration: {self.config}\n--- NVRTC log ---\n{log.rstrip()}"
        if excerpts:
            text += f"\n--- source around the errors ---\n{excerpts.rstrip()}"
        super().__init__(text)


class CorruptEntry(JitkernError):
    """A cache entry failed its format or SHA-256 check."""


class ToolchainError(JitkernError):
    """NVRTC or the CUDA headers could not be found, or the target is not supported."""
