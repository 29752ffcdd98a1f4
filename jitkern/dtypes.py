"""Names of the element types kernels are specialized for, and how each reaches C++."""

from __future__ import annotations

# name -> C++ type spelled in kernel sources (cuda_fp16.h / cuda_bf16.h / cuda_fp8.h)
C_TYPE = {
    "fp32": "float",
    "fp16": "__half",
    "bf16": "__nv_bfloat16",
    "fp8_e4m3": "__nv_fp8_e4m3",
}

_TORCH_NAMES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8_e4m3",
}


def from_torch(dtype) -> str:
    """torch.dtype -> jitkern dtype name ('fp32', 'bf16', ...); KeyError for others."""
    return _TORCH_NAMES[str(dtype).removeprefix("torch.")]
