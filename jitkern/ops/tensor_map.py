"""Tensor maps (CUtensorMap) of paged K/V caches, for kernels that load them with TMA.

A map describes a 16-bit or fp8 cache as a 3-D tensor whose box is one page (or the part of a
larger page that one pipeline of the kernel copies: jitkern.families.spec_dec_attention.
tma_box_rows) of one KV head, 128 bytes of head-dim columns wide (C = 64 16-bit or 128 one-byte
values), landing in shared memory in the 128-byte swizzle:

    NHD [pages, page_size, Hkv, D]  ->  dims (D, Hkv, pages * page_size), box (C, 1, rows)
    HND [pages, Hkv, page_size, D]  ->  dims (D, page_size, pages * Hkv), box (C, rows, 1)

Encoding is a host call into the driver (cuTensorMapEncodeTiled, through ctypes: CuPy's binding
has none; ``encode_tiled``). A map depends only on the cache's address, shape, dtype and box: its
caller keeps it (the op, per pair of K and V caches).
"""

from __future__ import annotations

import ctypes

from ..launch import driver_error, libcuda

# cuda.h enums
_DTYPE_UINT8, _DTYPE_UINT16 = 0, 1   # CU_TENSOR_MAP_DATA_TYPE_UINT8/16 (bits only copied)
_INTERLEAVE_NONE = 0
SWIZZLE_NONE, SWIZZLE_128B = 0, 3
L2_PROMOTION_NONE, L2_PROMOTION_128B, L2_PROMOTION_256B = 0, 2, 3
_OOB_FILL_ZERO = 0           # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-bounds elements are zeros
_ENCODE = None


def encode_tiled(addr: int, dims: tuple, strides: tuple, box: tuple, swizzle: int,
                 l2_promotion: int, element_size: int = 2) -> bytes:
    """cuTensorMapEncodeTiled of a tensor of 1- or 2-byte elements at ``addr``: ``dims``
    innermost first, byte ``strides`` of dims 1.. , a ``box`` of elements per copy;
    out-of-bounds elements land as zeros. RuntimeError naming the driver's error when it
    refuses."""
    global _ENCODE
    if _ENCODE is None:
        fn = libcuda().cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _ENCODE = fn
    n = len(dims)
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    out = (ctypes.c_uint8 * 128)()
    dtype = _DTYPE_UINT8 if element_size == 1 else _DTYPE_UINT16
    rc = _ENCODE(out, dtype, n, ctypes.c_void_p(addr), (u64 * n)(*dims),
                 (u64 * (n - 1))(*strides), (u32 * n)(*box), (u32 * n)(*([1] * n)),
                 _INTERLEAVE_NONE, swizzle, l2_promotion, _OOB_FILL_ZERO)
    if rc:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed: {driver_error(rc)} for dims {dims}, "
                           f"strides {strides}, box {box}")
    return bytes(out)


def fits_tensor_map(shape: tuple) -> bool:
    """Whether a paged cache of ``shape`` (NHD or HND) can have a map: the copies address the
    map's outer dimension (the pool's positions, NHD, or its page heads, HND: either way
    ``shape[0] * shape[1]``) with int32 coordinates."""
    return shape[0] * shape[1] < 2**31


def paged_kv_map(cache, layout: str, box_rows: int) -> bytes:
    """The 128-byte CUtensorMap of ``cache`` (a contiguous 16-bit or one-byte NHD or HND paged
    pool) with a box of ``box_rows`` positions x 128 bytes of head-dim columns of one KV head (see
    the module docstring). Raises ValueError where the cache cannot be described (wider
    elements, an address not 16-byte aligned, coordinates past int32), RuntimeError naming the
    driver's error otherwise."""
    shape = tuple(cache.shape)
    addr = cache.data_ptr()
    e = cache.element_size()
    if e not in (1, 2):
        raise ValueError(f"tensor maps of 16-bit or one-byte caches only, got {cache.dtype}")
    if addr % 16:
        raise ValueError(f"the cache's address {addr:#x} is not 16-byte aligned (TMA needs it)")
    if layout == "NHD":
        pages, ps, hkv, d = shape
        dims = (d, hkv, pages * ps)
        strides = (d * e, hkv * d * e)
        box = (128 // e, 1, box_rows)
    else:
        pages, hkv, ps, d = shape
        dims = (d, ps, pages * hkv)
        strides = (d * e, ps * d * e)
        box = (128 // e, box_rows, 1)
    if not fits_tensor_map(shape):
        raise ValueError(f"a cache of {dims[2]} {'positions' if layout == 'NHD' else 'page heads'}"
                         f" exceeds the int32 coordinates of a tensor map")
    return encode_tiled(addr, dims, strides, box, SWIZZLE_128B, L2_PROMOTION_128B, e)
