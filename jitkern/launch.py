"""Loading cubins on a device and launching their functions on torch's current stream.

Arguments are packed once into a ctypes structure laid out like the C parameters, so every
value reaches the kernel with its exact C type (a Python float is never passed as a double by
accident), and the launch goes straight to ``cuLaunchKernel`` through CuPy's driver binding.
"""

from __future__ import annotations

import ctypes
import threading

_CTYPES = {
    "ptr": ctypes.c_void_p, "i32": ctypes.c_int32, "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64, "u64": ctypes.c_uint64, "f32": ctypes.c_float,
    "f64": ctypes.c_double, "u8": ctypes.c_uint8,
}

# CUfunction_attribute values
_ATTRS = {"max_threads_per_block": 0, "static_shared_bytes": 1, "const_bytes": 2,
          "local_bytes": 3, "registers": 4, "ptx_version": 5, "binary_version": 6}
_MAX_DYNAMIC_SHARED = 8
_DEFAULT_DYNAMIC_SHARED = 48 * 1024


def _driver():
    from cupy_backends.cuda.api import driver

    return driver


def _make_packer(signature):
    """Build ``fill(struct, args)`` once per entry: pointer fields accept a tensor, an int or None."""
    lines = ["def fill(s, a):"]
    for i, (name, kind) in enumerate(signature):
        if kind == "ptr":
            lines.append(f"    v = a[{i}]\n    s.f{i} = v if v is None or v.__class__ is int else v.data_ptr()")
        else:
            lines.append(f"    s.f{i} = a[{i}]")
    if len(lines) == 1:
        lines.append("    pass")
    ns: dict = {}
    exec("\n".join(lines), ns)  # noqa: S102 - generated from a fixed signature, once per entry
    return ns["fill"]


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
        fields = [(f"f{i}", _CTYPES[k]) for i, (_, k) in enumerate(self.signature)]
        self._struct = type("Args", (ctypes.Structure,), {"_fields_": fields})
        self._offsets = [getattr(self._struct, f"f{i}").offset for i in range(len(fields))]
        self._fill = _make_packer(self.signature)
        self._nargs = len(self.signature)
        self._tls = threading.local()
        self._dyn_limit = _DEFAULT_DYNAMIC_SHARED
        self.attributes = {k: driver.funcGetAttribute(v, self.ptr) for k, v in _ATTRS.items()}

    def _buffers(self):
        """Per-thread argument struct and the void* array that points into it."""
        s = self._struct()
        base = ctypes.addressof(s)
        if self.packed:
            params = (ctypes.c_void_p * 1)(base)
        else:
            params = (ctypes.c_void_p * max(1, self._nargs))(*[base + o for o in self._offsets])
        buf = (s, params, ctypes.addressof(params))
        self._tls.buf = buf
        return buf

    def set_max_dynamic_shared(self, nbytes: int) -> None:
        _driver().funcSetAttribute(self.ptr, _MAX_DYNAMIC_SHARED, int(nbytes))
        self._dyn_limit = int(nbytes)

    def launch(self, grid, block, args, shared_mem: int = 0, stream: int | None = None) -> None:
        """Launch on ``stream`` (a raw cudaStream_t; default: torch's current stream of the device).

        ``grid``/``block``: 3-tuples (or shorter). ``args``: one value per signature field."""
        if len(args) != self._nargs:
            raise TypeError(f"{self.label}: expected {self._nargs} arguments "
                            f"({', '.join(n for n, _ in self.signature)}), got {len(args)}")
        buf = getattr(self._tls, "buf", None) or self._buffers()
        self._fill(buf[0], args)
        if shared_mem > self._dyn_limit:
            self.set_max_dynamic_shared(shared_mem)
        if stream is None:
            stream = _current_stream(self.device_index)
        g = tuple(grid) + (1, 1)
        b = tuple(block) + (1, 1)
        if g[0] * g[1] * g[2] == 0:
            return  # nothing to do (empty batch); CUDA rejects a zero grid
        self._launch_kernel(self.ptr, g[0], g[1], g[2], b[0], b[1], b[2], shared_mem, stream, buf[2], 0)


def _current_stream(index: int) -> int:
    import torch

    return torch.cuda.current_stream(index).cuda_stream


try:  # the raw-stream query torch's own compiled code uses: no Stream object per call
    import torch as _torch

    _raw = _torch._C._cuda_getCurrentRawStream  # type: ignore[attr-defined]

    def _current_stream(index: int) -> int:  # noqa: F811
        return _raw(index)
except Exception:  # no torch or no CUDA build: the slower public path above
    pass


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

    def launch(self, name: str, grid, block, args, shared_mem: int = 0, stream: int | None = None) -> None:
        """Launch entry ``name`` (see ``Function.launch``), on the kernel's device, leaving the
        caller's current device unchanged."""
        fn = self.functions[name]
        if _current_device() != self.device_index:
            import torch

            with torch.cuda.device(self.device_index):
                fn.launch(grid, block, args, shared_mem, stream)
        else:
            fn.launch(grid, block, args, shared_mem, stream)


def _current_device() -> int:
    import torch

    return torch.cuda.current_device()
