"""Names of the element types kernels are specialized for, and how each reaches C++."""

from __future__ import annotations

# name -> C++ type spelled in kernel sources (cuda_fp16.h / cuda_bf16.h / cuda_fp8.h)
C_TYPE = {
    "fp32": "float",
    "fp16": "__half",
    "bf16": "__nv_bfloat16",
    "fp8_e4m3": "__nv_fp8_e4m3",
}
