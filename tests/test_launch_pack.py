"""Argument packing of kernel launches (CPU): the bytes a kernel receives."""

import ctypes
import random

import pytest

from jitkern.launch import _CTYPES, _pack_error, arg_layout, make_packer

SIGNATURE = (("p", "ptr"), ("a", "u8"), ("b", "i64"), ("c", "i32"), ("q", "ptr"), ("d", "f32"),
             ("e", "u8"), ("f", "f64"), ("g", "u32"), ("h", "u64"), ("i", "i32"))


class _FakeTensor:
    def __init__(self, ptr):
        self.ptr = ptr

    def data_ptr(self):
        return self.ptr


def _ctypes_bytes(signature, values):
    st, _ = arg_layout(signature)
    s = st()
    for i, v in enumerate(values):
        setattr(s, f"f{i}", v)
    return ctypes.string_at(ctypes.addressof(s), ctypes.sizeof(s))


def _random_values(rng):
    return [rng.randrange(1, 2**64), rng.randrange(256), rng.randrange(-2**63, 2**63),
            rng.randrange(-2**31, 2**31), rng.randrange(1, 2**64), rng.uniform(-1e6, 1e6),
            rng.randrange(256), rng.uniform(-1e300, 1e300), rng.randrange(2**32),
            rng.randrange(2**64), rng.randrange(-2**31, 2**31)]


def test_layout_matches_ctypes_offsets_and_size():
    st, packer = arg_layout(SIGNATURE)
    assert packer.size == ctypes.sizeof(st)
    # u8 then i64: 7 pad bytes; the tail is padded to the struct's 8-byte alignment
    assert (st.f1.offset, st.f2.offset) == (8, 16) and packer.size % 8 == 0


@pytest.mark.parametrize("seed", range(5))
def test_packed_bytes_equal_the_ctypes_structure(seed):
    rng = random.Random(seed)
    values = _random_values(rng)
    st, packer = arg_layout(SIGNATURE)
    buf = ctypes.create_string_buffer(packer.size)
    # pointers given three ways: a tensor-like object, a raw int, None (NULL)
    args = list(values)
    args[0] = _FakeTensor(values[0])
    make_packer(SIGNATURE, packer)(buf, args)
    assert buf.raw == _ctypes_bytes(SIGNATURE, values)
    args[0], args[4] = None, values[4]
    make_packer(SIGNATURE, packer)(buf, args)
    assert buf.raw == _ctypes_bytes(SIGNATURE, [0] + values[1:])


def test_f32_field_is_rounded_to_float32_not_passed_as_double():
    sig = (("x", "f32"), ("y", "f64"))
    st, packer = arg_layout(sig)
    buf = ctypes.create_string_buffer(packer.size)
    make_packer(sig, packer)(buf, (1.1, 1.1))
    got = st.from_buffer_copy(buf.raw)
    assert got.f0 == ctypes.c_float(1.1).value != 1.1
    assert got.f1 == 1.1


def test_out_of_range_integer_is_an_error_naming_the_field():
    sig = (("n", "i32"), ("m", "u8"))
    _, packer = arg_layout(sig)
    buf = ctypes.create_string_buffer(packer.size)
    fill = make_packer(sig, packer)
    with pytest.raises(Exception) as info:
        fill(buf, (2**31, 0))
    err = _pack_error("fam:entry", sig, (2**31, 0), info.value)
    assert isinstance(err, ValueError)
    assert "fam:entry: argument 'n' (i32) cannot take 2147483648" in str(err)
    err = _pack_error("fam:entry", sig, (0, 256), info.value)
    assert "argument 'm' (u8) cannot take 256" in str(err)


def test_a_pointer_field_given_something_else_is_a_type_error():
    sig = (("x", "ptr"), ("n", "i32"))
    err = _pack_error("fam:entry", sig, ([1, 2], 3), AttributeError("x"))
    assert isinstance(err, TypeError) and "argument 'x' (ptr) cannot take [1, 2]" in str(err)


def test_a_float_for_an_integer_field_is_a_type_error():
    sig = (("n", "i64"),)
    err = _pack_error("fam:entry", sig, (1.5,), ValueError("x"))
    assert isinstance(err, TypeError) and "argument 'n' (i64) cannot take 1.5" in str(err)


def test_every_kind_has_a_struct_code():
    for kind in _CTYPES:
        arg_layout(((kind, kind),))


def test_programmatic_launch_config_has_cuda_h_layout():
    """cuLaunchKernelEx reads CUlaunchConfig (cuda.h) from the bytes launch.py packs: grid and
    block dims, shared bytes, then the stream, attribute array and count at 8-byte alignment."""
    import ctypes

    from jitkern.launch import _LAUNCH_CONFIG, _LaunchAttribute

    class CUlaunchConfig(ctypes.Structure):
        _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                    ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                    ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                    ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                    ("attrs", ctypes.c_void_p), ("numAttrs", ctypes.c_uint)]

    assert _LAUNCH_CONFIG.size == ctypes.sizeof(CUlaunchConfig) == 56
    buf = ctypes.create_string_buffer(_LAUNCH_CONFIG.size)
    _LAUNCH_CONFIG.pack_into(buf, 0, 7, 8, 9, 128, 2, 1, 4096, 0xDEADBEEF00, 0x1234560, 1)
    c = CUlaunchConfig.from_buffer_copy(buf.raw)
    assert (c.gridDimX, c.gridDimY, c.gridDimZ, c.blockDimX, c.blockDimY, c.blockDimZ) == \
        (7, 8, 9, 128, 2, 1)
    assert (c.sharedMemBytes, c.hStream, c.attrs, c.numAttrs) == (4096, 0xDEADBEEF00, 0x1234560, 1)
    # CUlaunchAttribute: a 4-byte id, 4 bytes of padding, a 64-byte value union
    assert ctypes.sizeof(_LaunchAttribute) == 72 and _LaunchAttribute.value.offset == 8


def test_tensor_map_fields_are_64_byte_aligned_128_bytes():
    """A "tmap" field sits at a multiple of 64 and pads the struct to a multiple of 64 (a C struct
    with an alignas(64) member); None packs zeros; anything but 128 bytes is refused by name."""
    sig = (("n", "i32"), ("p", "ptr"), ("f", "f32"), ("m", "tmap"), ("k", "u8"), ("w", "tmap"))
    st, packer = arg_layout(sig)
    assert (st.f0.offset, st.f1.offset, st.f2.offset) == (0, 8, 16)
    assert (st.f3.offset, st.f4.offset, st.f5.offset) == (64, 192, 256)
    assert packer.size == ctypes.sizeof(st) == 384
    buf = ctypes.create_string_buffer(packer.size)
    m = bytes(range(128))
    fill = make_packer(sig, packer)
    fill(buf, (-3, 0x1234, 1.5, m, 7, None))
    raw = buf.raw
    assert raw[64:192] == m and raw[256:384] == bytes(128) and raw[192] == 7
    assert int.from_bytes(raw[8:16], "little") == 0x1234
    for bad in (m[:64], bytearray(m), "x" * 128):
        with pytest.raises(TypeError) as info:
            fill(buf, (-3, 0, 1.5, bad, 7, None))
        err = _pack_error("fam:entry", sig, (-3, 0, 1.5, bad, 7, None), info.value)
        assert isinstance(err, TypeError) and "argument 'm' (tmap)" in str(err)
        assert "a tensor map is 128 bytes" in str(err)
