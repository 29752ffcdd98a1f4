"""Tensor maps (CUtensorMap) of paged K/V caches, for kernels that load them with TMA.

A map describes a 16-bit cache as a 3-D tensor whose box is one page (or one 64-position tile of
a larger page) of one KV head, 64 head-dim columns wide, landing in shared memory in the 128-byte
swizzle:

    NHD [pages, page_size, Hkv, D]  ->  dims (D, Hkv, pages * page_size), box (64, 1, rows)
    HND [pages, Hkv, page_size, D]  ->  dims (D, page_size, pages * Hkv), box (64, rows, 1)

Encoding is a host call into the driver (cuTensorMapEncodeTiled, through ctypes: CuPy's binding
has none). A map depends only on the cache's address, shape and dtype, so the last few are kept.
"""

from __future__ import annotations

import ctypes

_LIB = None
_MAPS: dict = {}     # (address, shape, dtype size, layout, rows) -> 128 bytes
_MAX_MAPS = 64       # a few caches (K and V per layer group) in turn; cleared when full

# cuda.h enums
_DTYPE_UINT16 = 1            # CU_TENSOR_MAP_DATA_TYPE_UINT16 (the bits are only copied)
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2       # L2 fetches of 128-byte lines, as the cp.async copies ask
_OOB_FILL_ZERO = 0           # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-bounds elements are zeros


def _libcuda():
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _LIB = lib
    return _LIB


def kv_box_rows(page_size: int, tile: int = 64) -> int:
    """Positions per box: a page, or one ``tile`` of a larger page."""
    return min(page_size, tile)


def paged_kv_map(cache, layout: str, box_rows: int) -> bytes:
    """The 128-byte CUtensorMap of ``cache`` (a contiguous 16-bit NHD or HND paged pool) with a
    box of ``box_rows`` positions x 64 head-dim columns of one KV head (see the module
    docstring). Raises ValueError where the cache cannot be described (an address not 16-byte
    aligned, coordinates past int32), RuntimeError naming the driver's error otherwise."""
    shape = tuple(cache.shape)
    addr = cache.data_ptr()
    key = (addr, shape, cache.element_size(), layout, box_rows)
    hit = _MAPS.get(key)
    if hit is not None:
        return hit
    if cache.element_size() != 2:
        raise ValueError(f"tensor maps of 16-bit caches only, got {cache.dtype}")
    if addr % 16:
        raise ValueError(f"the cache's address {addr:#x} is not 16-byte aligned (TMA needs it)")
    if layout == "NHD":
        pages, ps, hkv, d = shape
        dims = (d, hkv, pages * ps)
        strides = (d * 2, hkv * d * 2)
        box = (64, 1, box_rows)
    else:
        pages, hkv, ps, d = shape
        dims = (d, ps, pages * hkv)
        strides = (d * 2, ps * d * 2)
        box = (64, box_rows, 1)
    if dims[2] >= 2**31:
        raise ValueError(f"a cache of {dims[2]} {'positions' if layout == 'NHD' else 'page heads'}"
                         f" exceeds the int32 coordinates of a tensor map")
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    out = (ctypes.c_uint8 * 128)()
    lib = _libcuda()
    rc = lib.cuTensorMapEncodeTiled(out, _DTYPE_UINT16, 3, ctypes.c_void_p(addr), (u64 * 3)(*dims),
                                    (u64 * 2)(*strides), (u32 * 3)(*box), (u32 * 3)(1, 1, 1),
                                    _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B,
                                    _OOB_FILL_ZERO)
    if rc:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"cuTensorMapEncodeTiled failed: {(name.value or b'?').decode()} ({rc}) "
                           f"for a {layout} cache of shape {shape}, box {box}")
    if len(_MAPS) >= _MAX_MAPS:
        _MAPS.clear()
    m = _MAPS[key] = bytes(out)
    return m
