"""Per-call-signature plan caches of the ops.

An op validates a call and resolves its launch (specialization, grid, static arguments) once per
*signature*: every tensor's shape, strides, dtype and device plus the scalar arguments that the
checks look at (an op whose tensors must all be contiguous keys a contiguity flag instead of the
strides; devices past the first tensor's are keyed by index, see tensor_meta). A repeated call
with the same signature reuses that plan and only binds its new tensors. Values inside tensors
are never part of a signature (reading them would synchronize), nor are data pointers: the
alignment a kernel needs is checked per call (require_aligned).
"""

from __future__ import annotations


def require_aligned(name: str, t) -> None:
    """ValueError unless ``t`` starts at a 16-byte aligned address (the kernels move their large
    tensors in 16-byte pieces). Callers test ``t.data_ptr() % 16`` first, on the hot path."""
    if t.data_ptr() % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address (the kernel moves it "
                         f"in 16-byte vectors); got a storage offset of {t.storage_offset()} "
                         f"elements")


def tensor_meta(t):
    """The signature part of one optional tensor: (shape, strides, dtype, device index) or
    None. Raises AttributeError/TypeError for a non-tensor (the caller then runs the full
    checks). The device is keyed by its index (an int hashes and compares faster than a
    torch.device): each op keys one tensor's device whole, whose checks require CUDA, and
    requires the others on that device, so among plans (which exist only for calls that passed
    the checks) the index tells them apart."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


def contiguous_meta(t):
    """tensor_meta for an op whose tensors must all be contiguous: a contiguity flag stands for
    the strides (cheaper to build and compare per call)."""
    return None if t is None else (t.shape, t.is_contiguous(), t.dtype, t.get_device())


class PlanCache:
    """Signature -> plan, bounded: when full it is emptied (signatures are few per model, so a
    full cache means churn, where an LRU would not help either)."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._plans: dict = {}

    def get(self, key):
        """The plan of ``key``, or None (also for ``key`` None: a call without a signature)."""
        return None if key is None else self._plans.get(key)

    def put(self, key, plan) -> None:
        if key is None:
            return
        if len(self._plans) >= self.limit:
            self._plans.clear()
        self._plans[key] = plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()
