"""Device facts the ops' launch choices read, looked up once per device."""

from __future__ import annotations

import torch

_SMS: dict = {}   # torch.device -> SM count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (an index-less device means the current one)."""
    n = _SMS.get(device)
    if n is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        n = _SMS[device] = torch.cuda.get_device_properties(index).multi_processor_count
    return n


_CAPS: dict = {}  # torch.device -> (major, minor)


def capability(device: torch.device) -> tuple:
    """Compute capability of CUDA ``device`` (an index-less device means the current one)."""
    c = _CAPS.get(device)
    if c is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        c = _CAPS[device] = torch.cuda.get_device_capability(index)
    return c
