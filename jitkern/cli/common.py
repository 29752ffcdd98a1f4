"""Helpers shared by the commands: errors, targets, sizes, durations, tables."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


class CliError(Exception):
    """A problem the user can fix (bad argument, missing input): message, exit status 2."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in descriptions/epilogs as written."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---- targets ---------------------------------------------------------------------------------

def local_capability() -> tuple | None:
    """Compute capability of GPU 0 through CuPy (no torch import), or None without a GPU."""
    try:
        from cupy.cuda import runtime

        if runtime.getDeviceCount() < 1:
            return None
        props = runtime.getDeviceProperties(0)
        return int(props["major"]), int(props["minor"])
    except Exception:
        return None


def requested_archs(given: list | None, fallback: list | None = None) -> tuple[list, bool]:
    """The targets to warm: ``--arch`` values, else ``fallback`` (a manifest's), else
    $JITKERN_ARCH (exact, as the run time uses it), else the local GPU.

    Returns (normalized targets, exact). ``exact`` False means each names a GPU and every family
    gets the target the run time picks on that GPU (see ``family_target``)."""
    from .. import settings, toolchain

    exact = False
    archs = list(given or fallback or [])
    if not archs and settings.arch_override():
        archs, exact = [settings.arch_override()], True
    if not archs:
        cap = local_capability()
        if cap is None:
            raise CliError("no GPU here and no target given: pass the GPU architecture to compile "
                           "for, e.g. --arch sm_90a (H100/H200) or --arch sm_100a (B200); "
                           "repeat --arch for several")
        archs = [f"sm_{cap[0]}{cap[1]}"]
    out = []
    for a in archs:
        try:
            n = toolchain.normalize_arch(a)
        except ValueError as e:
            raise CliError(f"--arch: {e}") from None
        if n not in out:
            out.append(n)
    return out, exact


def family_target(family, arch: str, exact: bool) -> str:
    """The exact target ``family`` is compiled for when warming for ``arch``.

    Not exact: ``arch`` names a GPU generation, and the target is what the run time resolves on a
    device of that compute capability (``sm_90a`` for families that use arch-specific
    instructions, ``sm_90`` otherwise), so warmed entries are the ones the first call looks up.
    Exact: ``arch`` as given (for deployments that set $JITKERN_ARCH)."""
    from .. import toolchain

    if exact:
        return toolchain.resolve_arch(family, arch)
    n = toolchain.arch_number(arch)
    return toolchain.resolve_arch(family, capability=(n // 10, n % 10))


def check_targets(targets) -> None:
    """CliError naming what NVRTC supports when it cannot compile for a target."""
    from .. import toolchain
    from ..errors import ToolchainError

    for t in sorted(set(targets)):
        try:
            toolchain.check_supported(t)
        except ToolchainError as e:
            raise CliError(str(e)) from None


# ---- units -----------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '30d', '2w', '3600' -> seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"duration {text!r}: expected a number with s, m, h, d or w (e.g. 30d, 12h)")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


def ago(ts: float, now: float | None = None) -> str:
    if not ts:
        return "-"
    d = max(0.0, (now or time.time()) - ts)
    for unit, s in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= s:
            return f"{d / s:.0f}{unit} ago"
    return f"{d:.0f}s ago"


def table(rows: list, headers: list, right: set = frozenset(), out=None) -> None:
    """Print ``rows`` (lists of cells) under ``headers``; column indices in ``right`` align right."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        line = "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(r))
        print(line.rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
