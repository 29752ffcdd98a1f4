"""Registering jitkern ops as ``torch.library`` custom ops (so they work under torch.compile).

Custom ops may not return an alias of an input, so an op mutates its ``out`` argument in place
and returns None; the public Python wrapper allocates ``out`` when needed and returns it.
"""

from __future__ import annotations

from typing import Callable, Iterable


def custom_op(qualname: str, *, mutates_args: Iterable[str], fake: Callable | None = None,
              device_types: str | None = "cuda"):
    """Decorator: register ``fn`` as the custom op ``qualname`` ("jitkern::name").

    ``fake``: the meta implementation used by torch.compile / FakeTensor tracing; default: one
    that returns None (right for ops that only mutate their arguments). Returns the op object,
    callable like the function; ``op.register_fake`` stays available."""
    import torch

    if "::" not in qualname:
        qualname = f"jitkern::{qualname}"

    def wrap(fn):
        op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args),
                                     device_types=device_types)(fn)
        op.register_fake(fake if fake is not None else _returns_none)
        return op

    return wrap


def _returns_none(*args, **kwargs):
    return None
