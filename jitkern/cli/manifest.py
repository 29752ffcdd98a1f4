"""Warm-up manifests: TOML or JSON files that list kernel families and parameter grids.

    arch = ["sm_90a"]            # optional: targets when no --arch is given

    [[kernel]]
    family = "spec_dec_attention"
    head_dim = 128               # one value
    page_size = [16, 64]         # a list is a grid axis: the product of all axes is compiled
    ...

JSON has the same shape: ``{"arch": [...], "kernel": [{"family": ..., ...}, ...]}``. Every
value is checked against the family's declaration before anything is compiled; an error names
the file, the line (found by scanning the text: the parsers do not keep positions), the kernel
table, the parameter and the allowed values. ``skip_invalid = true`` in a table drops the
combinations of its grid that the family's cross-parameter rules reject instead of failing.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

RESERVED = ("family", "skip_invalid")


class ManifestError(ValueError):
    """A manifest that cannot be read or names something the families do not accept."""


class _Locator:
    """Line numbers of kernel tables and their keys, found by scanning the manifest text."""

    def __init__(self, text: str, is_json: bool):
        self.lines = text.splitlines()
        self.is_json = is_json
        if is_json:  # every kernel object has exactly one "family" key: it anchors the object
            self.anchors = [i for i, ln in enumerate(self.lines) if re.search(r'"family"\s*:', ln)]
        else:
            self.anchors = [i for i, ln in enumerate(self.lines)
                            if re.match(r"\s*\[\[\s*kernel\s*\]\]", ln)]

    def _key_re(self, key: str):
        if self.is_json:
            return re.compile(rf'"{re.escape(key)}"\s*:')
        return re.compile(rf'^\s*(?:"{re.escape(key)}"|{re.escape(key)})\s*=')

    def table(self, index: int) -> int | None:
        return self.anchors[index] + 1 if index < len(self.anchors) else None

    def key(self, index: int, key: str) -> int | None:
        """1-based line of ``key`` in kernel table ``index``, or None."""
        if index >= len(self.anchors):
            return None
        a = self.anchors[index]
        if not self.is_json:
            lo = a                      # a TOML table runs from its header to the next one
        else:                           # keys of a JSON object may sit before its "family"
            lo = self.anchors[index - 1] + 1 if index > 0 else 0
        hi = self.anchors[index + 1] if index + 1 < len(self.anchors) else len(self.lines)
        pat = self._key_re(key)
        hits = [i for i in range(lo, hi) if pat.search(self.lines[i])]
        if not hits:
            return None
        return min(hits, key=lambda i: abs(i - a)) + 1

    def top(self, key: str) -> int | None:
        pat = self._key_re(key)
        end = self.anchors[0] if (self.anchors and not self.is_json) else len(self.lines)
        for i in range(end):
            if pat.search(self.lines[i]):
                return i + 1
        return None


class Manifest:
    """A parsed manifest: ``archs`` (or None) and ``items`` [(family, config), ...]."""

    def __init__(self, path: Path, archs, items):
        self.path = path
        self.archs = archs
        self.items = items


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _parse(path: Path, text: str):
    is_json = path.suffix.lower() == ".json" or (
        path.suffix.lower() != ".toml" and text.lstrip().startswith(("{", "[")))
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            raise ManifestError(f"{_where(path, int(m.group(1)) if m else None)}: not valid TOML: "
                                f"{e}") from None
    return data, is_json


def load(path, families: dict) -> Manifest:
    """Read and expand the manifest at ``path`` against ``families`` {name: KernelFamily}.

    Raises ManifestError pointing at the place in the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror or e}") from None
    data, is_json = _parse(path, text)
    loc = _Locator(text, is_json)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: the manifest must be a table/object with a 'kernel' list")
    unknown = sorted(set(data) - {"arch", "kernel"})
    if unknown:
        raise ManifestError(f"{_where(path, loc.top(unknown[0]))}: unknown top-level key "
                            f"{unknown[0]!r}; expected 'kernel' (a list of kernel tables) and "
                            f"optionally 'arch'")
    archs = data.get("arch")
    if archs is not None:
        if isinstance(archs, str):
            archs = [archs]
        if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
            raise ManifestError(f"{_where(path, loc.top('arch'))}: 'arch' must be a target or a "
                                f"list of targets, e.g. [\"sm_90a\"]")
    tables = data.get("kernel")
    if not isinstance(tables, list) or not tables:
        hint = "[[kernel]] tables" if not is_json else 'a "kernel": [...] list of objects'
        raise ManifestError(f"{path}: no kernels listed; add {hint}, each with a 'family' and "
                            f"its parameters")
    items = []
    for i, table in enumerate(tables):
        items += _expand(path, loc, i, table, families)
    return Manifest(path, archs, items)


def _expand(path: Path, loc: _Locator, i: int, table, families: dict) -> list:
    label = f"kernel #{i + 1}"
    if not isinstance(table, dict):
        raise ManifestError(f"{_where(path, loc.table(i))}: {label} must be a table of "
                            f"parameters, got {type(table).__name__}")
    name = table.get("family")
    if not isinstance(name, str):
        raise ManifestError(f"{_where(path, loc.table(i))}: {label} has no 'family' (one of: "
                            f"{', '.join(sorted(families))})")
    fam = families.get(name)
    if fam is None:
        raise ManifestError(f"{_where(path, loc.key(i, 'family'))}: {label}: unknown family "
                            f"{name!r}{_did_you_mean(name, families)}; registered: "
                            f"{', '.join(sorted(families))}")
    label += f" ({name})"
    skip_invalid = table.get("skip_invalid", False)
    if not isinstance(skip_invalid, bool):
        raise ManifestError(f"{_where(path, loc.key(i, 'skip_invalid'))}: {label}: skip_invalid "
                            f"must be true or false")
    params = {p.name: p for p in fam.params}
    grid = {}
    for key, value in table.items():
        if key in RESERVED:
            continue
        where = _where(path, loc.key(i, key))
        p = params.get(key)
        if p is None:
            raise ManifestError(f"{where}: {label}: unknown parameter {key!r}"
                                f"{_did_you_mean(key, params)}; parameters of {name}: "
                                f"{', '.join(params)}")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ManifestError(f"{where}: {label}: parameter {key!r} has an empty list")
        for v in values:
            if not p.accepts(v):
                raise ManifestError(f"{where}: {label}: parameter {key!r} = {v!r} is not allowed; "
                                    f"allowed values: {p.allowed()}")
        grid[key] = values
    for p in fam.params:
        if p.name not in grid and p.default is None:
            raise ManifestError(f"{_where(path, loc.table(i))}: {label}: parameter {p.name!r} is "
                                f"missing (no default); allowed values: {p.allowed()}")
    from ..family import iter_configs

    out = []
    for cfg in iter_configs(grid):
        try:
            fam.canonical(cfg)
        except ValueError as e:
            if skip_invalid:
                continue
            raise ManifestError(f"{_where(path, loc.table(i))}: {label}: the combination {cfg} is "
                                f"rejected: {e}. Narrow the grid, or set skip_invalid = true in "
                                f"this table to drop such combinations") from None
        out.append((name, cfg))
    if not out:
        raise ManifestError(f"{_where(path, loc.table(i))}: {label}: every combination of the "
                            f"grid is rejected by the family's rules")
    return out


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
