"""Device facts the ops' launch choices read, looked up once per device."""

from __future__ import annotations

import torch


def device_index(device) -> int:
    """The index of CUDA ``device``: a torch.device or "cuda[:i]" (index-less: the current
    device), or already an index."""
    if isinstance(device, int):
        return device
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


_SMS: dict = {}   # torch.device -> SM count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (an index-less device means the current one)."""
    n = _SMS.get(device)
    if n is None:
        n = _SMS[device] = torch.cuda.get_device_properties(
            device_index(device)).multi_processor_count
    return n


_CAPS: dict = {}  # torch.device -> (major, minor)


def capability(device: torch.device) -> tuple:
    """Compute capability of CUDA ``device`` (an index-less device means the current one)."""
    c = _CAPS.get(device)
    if c is None:
        c = _CAPS[device] = torch.cuda.get_device_capability(device_index(device))
    return c
