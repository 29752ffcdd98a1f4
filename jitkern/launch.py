"""Loading cubins on a device and launching their functions on torch's current stream.

Arguments are packed into a buffer laid out like the C parameters (the layout ctypes computes for
the signature, written by one precompiled ``struct.pack_into`` per call), so every value reaches
the kernel with its exact C type (a Python float is never passed as a double by accident, an
out-of-range integer is an error rather than a wrapped value), and the launch goes straight to
``cuLaunchKernel`` through CuPy's driver binding.

A launch may ask for programmatic dependent launch (``pdl=True``, sm_90 and later): the kernel
may then start while the previous kernel on the stream is still running, once that kernel has
executed ``griddepcontrol.launch_dependents`` in every CTA, and must execute
``griddepcontrol.wait`` before it reads anything that kernel writes. CuPy's binding has no
``cuLaunchKernelEx``, so these launches call the driver through ctypes.
"""

from __future__ import annotations

import ctypes
import struct
import threading

_CTYPES = {
    "ptr": ctypes.c_void_p, "i32": ctypes.c_int32, "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64, "u64": ctypes.c_uint64, "f32": ctypes.c_float,
    "f64": ctypes.c_double, "u8": ctypes.c_uint8, "tmap": ctypes.c_uint8 * 128,
}
_TMAP_ALIGN = 64   # a CUtensorMap's alignment (cuda.h: CU_TENSOR_MAP_NUM_QWORDS 16, aligned 64)
_TMAP_ZERO = bytes(128)

# CUfunction_attribute values
_ATTRS = {"max_threads_per_block": 0, "static_shared_bytes": 1, "const_bytes": 2,
          "local_bytes": 3, "registers": 4, "ptx_version": 5, "binary_version": 6}
_MAX_DYNAMIC_SHARED = 8
_DEFAULT_DYNAMIC_SHARED = 48 * 1024


# cuLaunchKernelEx's configuration (cuda.h): CUlaunchConfig and one CUlaunchAttribute.
_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


# CUlaunchConfig: grid (3 x u32), block (3 x u32), shared bytes (u32), stream, attribute array,
# attribute count (u32); written with one pack_into per launch
_LAUNCH_CONFIG = struct.Struct("=7I4xQQI4x")


_LIBCUDA = None


def libcuda():
    """The driver library through ctypes, for the calls CuPy's binding lacks (cuLaunchKernelEx
    here, cuTensorMapEncodeTiled in jitkern.ops.tensor_map); loaded on first use."""
    global _LIBCUDA
    if _LIBCUDA is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernelEx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p]
        lib.cuLaunchKernelEx.restype = ctypes.c_int
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _LIBCUDA = lib
    return _LIBCUDA


def driver_error(rc: int) -> str:
    """A CUresult as "NAME (code)"."""
    name = ctypes.c_char_p()
    libcuda().cuGetErrorName(rc, ctypes.byref(name))
    return f"{(name.value or b'?').decode()} ({rc})"


def _driver():
    from cupy_backends.cuda.api import driver

    return driver


_STRUCT_CODES = {"ptr": "Q", "i32": "i", "u32": "I", "i64": "q", "u64": "Q", "f32": "f",
                 "f64": "d", "u8": "B", "tmap": "128s"}


def arg_layout(signature):
    """(ctypes Structure type, struct.Struct) with the C layout of ``signature``'s fields: the
    struct format reproduces ctypes' offsets and tail padding with explicit pad bytes. A "tmap"
    field (128 bytes) is aligned to 64 bytes, and a struct holding one is padded to a multiple of
    64, as a C struct with an ``alignas(64)`` member is (ctypes has no such alignment, so the
    padding is written as fields of its own)."""
    fields, pos = [], 0   # pos: the end of the fields so far (ctypes pads the others itself)
    for i, (_, k) in enumerate(signature):
        t = _CTYPES[k]
        align = _TMAP_ALIGN if k == "tmap" else ctypes.alignment(t)
        if pos % align:
            if k == "tmap":
                fields.append((f"_pad{i}", ctypes.c_uint8 * (align - pos % align)))
            pos += align - pos % align
        fields.append((f"f{i}", t))
        pos += ctypes.sizeof(t)
    if any(k == "tmap" for _, k in signature) and pos % _TMAP_ALIGN:
        fields.append(("_tail", ctypes.c_uint8 * (_TMAP_ALIGN - pos % _TMAP_ALIGN)))
    st = type("Args", (ctypes.Structure,), {"_fields_": fields})
    fmt, pos = "=", 0
    for i, (_, kind) in enumerate(signature):
        off = getattr(st, f"f{i}").offset
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += _STRUCT_CODES[kind]
        pos = off + ctypes.sizeof(_CTYPES[kind])
    if ctypes.sizeof(st) > pos:
        fmt += f"{ctypes.sizeof(st) - pos}x"
    return st, struct.Struct(fmt)


def make_packer(signature, packer: struct.Struct):
    """Build ``fill(buffer, args)`` once per entry: one ``pack_into`` of all fields; pointer
    fields accept a tensor (its data_ptr()), an int or None; tensor-map fields 128 bytes or None
    (zeros)."""
    vals = []
    lines = ["def fill(buf, a):"]
    for i, (_, kind) in enumerate(signature):
        if kind == "ptr":
            lines.append(f"    v{i} = a[{i}]")
            vals.append(f"0 if v{i} is None else v{i} if v{i}.__class__ is int else "
                        f"v{i}.data_ptr()")
        elif kind == "tmap":
            lines.append(f"    v{i} = tmap_bytes(a[{i}])")
            vals.append(f"v{i}")
        else:
            vals.append(f"a[{i}]")
    lines.append("    pack_into(buf, 0" + "".join(f", ({v})" for v in vals) + ")")
    ns: dict = {"pack_into": packer.pack_into, "tmap_bytes": _tmap_bytes}
    exec("\n".join(lines), ns)  # noqa: S102 - generated from a fixed signature, once per entry
    return ns["fill"]


def _tmap_bytes(v) -> bytes:
    """A tensor-map field's bytes: exactly 128 (struct's "128s" would pad or cut silently)."""
    if v is None:
        return _TMAP_ZERO
    if v.__class__ is not bytes or len(v) != 128:
        raise TypeError(f"a tensor map is 128 bytes, got {type(v).__name__}"
                        + (f" of {len(v)}" if isinstance(v, (bytes, bytearray)) else ""))
    return v


def _pack_error(label: str, signature, args, err: Exception) -> Exception:
    """The field that could not be packed, named (the slow path of a failed launch)."""
    for (name, kind), v in zip(signature, args):
        if kind == "tmap":
            try:
                _tmap_bytes(v)
            except TypeError as e:
                return TypeError(f"{label}: argument {name!r} (tmap) cannot take {v!r:.40}: {e}")
            continue
        if kind == "ptr" and (v is None or v.__class__ is int or hasattr(v, "data_ptr")):
            v = 0 if v is None else v if v.__class__ is int else v.data_ptr()
        try:
            struct.pack("=" + _STRUCT_CODES[kind], v)
        except (struct.error, TypeError) as e:
            return (TypeError if isinstance(e, TypeError) or "integer" in str(e) else ValueError)(
                f"{label}: argument {name!r} ({kind}) cannot take {v!r}: {e}")
    return ValueError(f"{label}: could not pack the arguments: {err}")


class Function:
    """One kernel function loaded on one device."""

    def __init__(self, module, lowered: str, entry, device_index: int, label: str):
        driver = _driver()
        self._launch_kernel = driver.launchKernel
        self._fn = module.get_function(lowered)
        self.ptr = self._fn.ptr
        self.device_index = device_index
        self.label = label
        self.signature = tuple(entry.signature)
        self.packed = entry.packed
        self._struct, self._packer = arg_layout(self.signature)
        self._offsets = [getattr(self._struct, f"f{i}").offset for i in range(len(self.signature))]
        self._fill = make_packer(self.signature, self._packer)
        self._nargs = len(self.signature)
        self._tls = threading.local()
        self.attributes = {k: driver.funcGetAttribute(v, self.ptr) for k, v in _ATTRS.items()}
        # without the opt-in, static and dynamic shared memory together may not pass 48 KiB
        self._dyn_limit = _DEFAULT_DYNAMIC_SHARED - self.attributes["static_shared_bytes"]

    def _buffers(self):
        """Per-thread argument struct and the void* array that points into it."""
        s = ctypes.create_string_buffer(max(1, self._packer.size))
        base = ctypes.addressof(s)
        if self.packed:
            params = (ctypes.c_void_p * 1)(base)
        else:
            params = (ctypes.c_void_p * max(1, self._nargs))(*[base + o for o in self._offsets])
        # the programmatic launch's configuration, filled per call (grid, block, stream), and
        # the driver entry it goes through
        attr = _LaunchAttribute(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        conf = ctypes.create_string_buffer(_LAUNCH_CONFIG.size)
        buf = (s, params, ctypes.addressof(params), conf, ctypes.addressof(attr),
               ctypes.addressof(conf), attr, libcuda().cuLaunchKernelEx)
        self._tls.buf = buf
        return buf

    def set_max_dynamic_shared(self, nbytes: int) -> None:
        _driver().funcSetAttribute(self.ptr, _MAX_DYNAMIC_SHARED, int(nbytes))
        self._dyn_limit = int(nbytes)

    def launch(self, grid, block, args, shared_mem: int = 0, stream: int | None = None,
               pdl: bool = False) -> None:
        """Launch on ``stream`` (a raw cudaStream_t; default: torch's current stream of the device).

        ``grid``/``block``: 3-tuples (or shorter). ``args``: one value per signature field.
        ``pdl``: programmatic dependent launch (see the module docstring); the caller checks that
        the device supports it (compute capability 9.0 or later) and that the kernel waits."""
        if len(args) != self._nargs:
            raise TypeError(f"{self.label}: expected {self._nargs} arguments "
                            f"({', '.join(n for n, _ in self.signature)}), got {len(args)}")
        buf = getattr(self._tls, "buf", None) or self._buffers()
        try:
            self._fill(buf[0], args)
        except (struct.error, TypeError, AttributeError) as err:
            raise _pack_error(self.label, self.signature, args, err) from None
        if shared_mem > self._dyn_limit:
            self.set_max_dynamic_shared(shared_mem)
        if stream is None:
            stream = _current_stream(self.device_index)
        g = grid if len(grid) == 3 else tuple(grid) + (1,) * (3 - len(grid))
        b = block if len(block) == 3 else tuple(block) + (1,) * (3 - len(block))
        if g[0] * g[1] * g[2] == 0:
            return  # nothing to do (empty batch); CUDA rejects a zero grid
        if pdl:
            self._launch_programmatic(buf, g, b, shared_mem, stream)
            return
        self._launch_kernel(self.ptr, g[0], g[1], g[2], b[0], b[1], b[2], shared_mem, stream, buf[2], 0)

    def _launch_programmatic(self, buf, g, b, shared_mem: int, stream: int) -> None:
        _LAUNCH_CONFIG.pack_into(buf[3], 0, *g, *b, shared_mem, stream, buf[4], 1)
        rc = buf[7](buf[5], self.ptr, buf[2], None)
        if rc:
            raise RuntimeError(f"{self.label}: cuLaunchKernelEx failed: {driver_error(rc)}")


def _current_stream(index: int) -> int:
    import torch

    return torch.cuda.current_stream(index).cuda_stream


class LoadedKernel:
    """A specialization's cubin loaded on one device: its functions by entry name."""

    def __init__(self, entry, spec, device_index: int):
        import cupy

        self.entry = entry
        self.name = entry.name
        self.device_index = device_index
        with cupy.cuda.Device(device_index):
            self.module = cupy.cuda.function.Module()
            self.module.load(entry.cubin)
            self.functions = {
                k: Function(self.module, entry.lowered_names[k], spec.family.entries[k],
                            device_index, f"{entry.name}:{k}")
                for k in spec.family.entries
            }

    def function(self, name: str) -> Function:
        return self.functions[name]

    def launch(self, name: str, grid, block, args, shared_mem: int = 0, stream: int | None = None,
               pdl: bool = False) -> None:
        """Launch entry ``name`` (see ``Function.launch``), on the kernel's device, leaving the
        caller's current device unchanged."""
        fn = self.functions[name]
        if _current_device() != self.device_index:
            import torch

            with torch.cuda.device(self.device_index):
                fn.launch(grid, block, args, shared_mem, stream, pdl)
        else:
            fn.launch(grid, block, args, shared_mem, stream, pdl)


def _current_device() -> int:
    import torch

    return torch.cuda.current_device()


# The C queries torch's own compiled code uses, with no Stream object and no lazy-init check per
# call: the raw current stream, the current device. Without torch or a CUDA build of it, the
# public paths above.
try:
    import torch as _torch

    _current_stream = _torch._C._cuda_getCurrentRawStream  # type: ignore  # noqa: F811
    _current_device = _torch._C._cuda_getDevice  # type: ignore  # noqa: F811
except Exception:  # noqa: BLE001
    pass
