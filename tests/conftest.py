"""Shared fixtures: GPU skipping, isolated cache directories, and running code in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """An isolated environment for jitkern subprocesses: its own cache dir, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    env["JITKERN_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_py(code: str, env: dict, cwd=None, timeout: float = 120, check: bool = True, **kw):
    """Run ``code`` in a fresh interpreter; returns (parsed JSON of the last stdout line, proc)."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    data = json.loads(lines[-1]) if lines and lines[-1].startswith(("{", "[", "\"")) else None
    return data, proc


def entry_files(cache_dir: Path) -> list[Path]:
    """The value files of a disk cache (the cubin entries), not the index or the locks."""
    return sorted(p for p in Path(cache_dir).rglob("*.val") if p.is_file())
