"""Kernel sources: where they live, and the closure of files a source includes.

The closure is read once per family per process; its digest (relative names and bytes, never
absolute paths) is part of the cache key, and the same bytes are handed to NVRTC as in-memory
headers, so what is hashed is exactly what is compiled.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)


def kernels_root() -> Path:
    """The project's kernels_src/: beside the package in a checkout, inside it when installed."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "kernels_src", here / "kernels_src"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("jitkern's kernels_src directory is missing from this installation")


@dataclass(frozen=True)
class Closure:
    main_name: str
    main_text: str
    headers: tuple          # ((relative name, text), ...) project headers, sorted
    system_includes: tuple  # sorted names of <...> / unresolved includes (for the header digest)
    digest: str


def read_closure(root: Path, source: str) -> Closure:
    """Read ``source`` (relative to ``root``) and every project header it includes, recursively."""
    root = Path(root)
    texts: dict[str, str] = {}
    system: set[str] = set()
    todo = [source]
    while todo:
        rel = todo.pop()
        if rel in texts:
            continue
        path = root / rel
        try:
            text = path.read_text()
        except OSError as e:
            raise FileNotFoundError(f"kernel source {rel!r} not found under {root.name}/: {e}") from None
        texts[rel] = text
        base = Path(rel).parent
        for kind, name in INCLUDE.findall(text):
            if kind == '"':
                for cand in ((base / name).as_posix(), name):
                    if (root / cand).is_file():
                        todo.append(_norm(cand))
                        break
                else:
                    system.add(name)
            else:
                system.add(name)
    h = hashlib.sha256()
    for rel in sorted(texts):
        data = texts[rel].encode()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    headers = tuple(sorted((k, v) for k, v in texts.items() if k != source))
    return Closure(source, texts[source], headers, tuple(sorted(system)), h.hexdigest())


def _norm(p: str) -> str:
    parts: list[str] = []
    for part in p.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)
