"""A small family that exercises every mechanism of the service: macros and template
parameters, packed and unpacked arguments of every C type. Tests and benchmarks use it."""

from __future__ import annotations

from .. import dtypes
from ..family import Entry, IntRange, KernelFamily, Param, register_family

ARG_TYPES = (("p_out", "ptr"), ("a_i32", "i32"), ("a_u32", "u32"), ("a_i64", "i64"),
             ("a_u64", "u64"), ("a_f32", "f32"), ("a_f64", "f64"), ("a_u8", "u8"))

SELFTEST = register_family(KernelFamily(
    name="selftest",
    source="selftest.cu",
    description="axpy and an argument probe; used by the service's own tests and benchmarks",
    params=(
        Param("dtype", ("fp32", "fp16", "bf16"), via="template", render=dtypes.C_TYPE),
        Param("unroll", IntRange(1, 8), default=1),
    ),
    entries={
        "axpy": Entry("jk_selftest::axpy<{dtype}>",
                      signature=(("y", "ptr"), ("x", "ptr"), ("a", "f32"), ("n", "i64"))),
        "probe": Entry("jk_selftest::probe", signature=ARG_TYPES),
        "probe_packed": Entry("jk_selftest::probe_packed", signature=ARG_TYPES, packed=True),
    },
    warmup=(dict(dtype="fp32"), dict(dtype="bf16")),
))
