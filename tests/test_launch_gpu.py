"""Launching compiled kernels on torch tensors (GPU): streams, graphs, argument types, devices."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jitkern  # noqa: E402
from jitkern.entry import CacheEntry  # noqa: E402
from jitkern.families.selftest import SELFTEST  # noqa: E402
from jitkern.service import SERVICE, get_kernel  # noqa: E402

pytestmark = pytest.mark.gpu

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def axpy(y, x, a, unroll=1):
    k = get_kernel(SELFTEST, {"dtype": {v: k for k, v in DT.items()}[y.dtype], "unroll": unroll}, y.device)
    n = y.numel()
    k.launch("axpy", grid=(min(1024, (n + 255) // 256),), block=(256,),
             args=(y, x, np.float32(a), n))
    return y


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("unroll", [1, 3])
@pytest.mark.parametrize("n", [1, 1000, 1 << 20])
def test_axpy_on_the_default_stream(dtype, unroll, n):
    x = torch.randn(n, device="cuda", dtype=DT[dtype])
    y = torch.randn(n, device="cuda", dtype=DT[dtype])
    ref = (1.7 * x.double() + y.double())
    axpy(y, x, 1.7, unroll)
    torch.cuda.synchronize()
    tol = 1e-6 if dtype == "fp32" else 2e-2
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol)


def test_launch_is_ordered_on_a_side_stream():
    n = 1 << 22
    x = torch.randn(n, device="cuda")
    src = torch.randn(n, device="cuda")
    y = torch.full((n,), float("nan"), device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)   # keeps the side stream busy ~tens of ms
        y.copy_(src)                     # must happen before the kernel
        axpy(y, x, 2.0)                  # must be queued on `side`, after the copy
        z = y * 3                        # torch work after the kernel on the same stream
    side.synchronize()
    ref = (2.0 * x.double() + src.double())
    assert torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(z.double(), 3 * ref, rtol=1e-6, atol=1e-5)


def test_graph_capture_and_replay():
    n = 1 << 16
    x = torch.randn(n, device="cuda")
    y = torch.randn(n, device="cuda")
    axpy(y, x, 0.5)  # warm: compile and load before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        before = jitkern.stats()["compiles"]
        with torch.cuda.graph(g, stream=s):
            axpy(y, x, 0.5)
        assert jitkern.stats()["compiles"] == before
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        x.copy_(torch.randn(n, device="cuda"))
        y0 = torch.randn(n, device="cuda")
        y.copy_(y0)
        g.replay()
        torch.cuda.synchronize()
        assert torch.allclose(y, 0.5 * x + y0, rtol=1e-6, atol=1e-6)


PROBE = (-2**31, 2**32 - 1, -2**62 - 12345, 2**64 - 3, 1.1, 1.1, 255)


def needs_sm90():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("entry", ["probe", "probe_packed"])
def test_every_c_type_arrives_exactly(entry, pdl):
    """Both launch paths (cuLaunchKernel, and cuLaunchKernelEx for programmatic launches) pass
    every argument with its exact C type, as separate parameters and as one packed struct."""
    if pdl:
        needs_sm90()
    k = get_kernel(SELFTEST, {"dtype": "fp32"}, torch.device("cuda"))
    out = torch.full((8,), float("nan"), device="cuda", dtype=torch.float64)
    k.launch(entry, (1,), (32,), (out, *PROBE), pdl=pdl)
    torch.cuda.synchronize()
    got = out.cpu()
    assert got[0].item() == -2**31
    assert got[1].item() == 2**32 - 1
    assert got[2].item() == float(-2**62 - 12345)
    assert got[3].item() == float(2**64 - 3)
    assert got[4].item() == float(np.float32(1.1))   # a float32, not a double
    assert got[5].item() == 1.1                       # a double
    assert got[6].item() == 255
    assert got.view(torch.int64)[7].item() == (2**64 - 3) - 2**64  # exact u64 bits


def test_programmatic_launch_runs_in_stream_order_and_in_graphs():
    """A programmatic launch of a kernel that never waits still follows the previous kernel
    (no early trigger there), on a side stream and when captured and replayed."""
    needs_sm90()
    k = get_kernel(SELFTEST, {"dtype": "fp32"}, torch.device("cuda"))
    n = 1 << 20
    x, src = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    y = torch.full((n,), float("nan"), device="cuda")

    def step():
        y.copy_(src)
        k.launch("axpy", grid=(1024,), block=(256,), args=(y, x, np.float32(2.0), n), pdl=True)

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)
        step()
    side.synchronize()
    assert torch.equal(y, 2.0 * x + src)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(g, stream=side):
            step()
    for _ in range(2):
        x.copy_(torch.randn(n, device="cuda"))
        src.copy_(torch.randn(n, device="cuda"))
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, 2.0 * x + src)


def test_a_failed_programmatic_launch_names_the_driver_error():
    needs_sm90()
    k = get_kernel(SELFTEST, {"dtype": "fp32"}, torch.device("cuda"))
    y = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match=r"axpy: cuLaunchKernelEx failed: CUDA_ERROR_INVALID_VALUE"):
        k.launch("axpy", (1,), (4096,), (y, y, np.float32(1), 8), pdl=True)


def test_wrong_argument_count_is_a_clear_error():
    k = get_kernel(SELFTEST, {"dtype": "fp32"}, torch.device("cuda"))
    with pytest.raises(TypeError, match=r"expected 4 arguments \(y, x, a, n\), got 3"):
        k.launch("axpy", (1,), (32,), (None, None, np.float32(1)))


def test_memory_hit_returns_the_loaded_kernel():
    cfg = {"dtype": "bf16", "unroll": 2}
    k1 = get_kernel(SELFTEST, cfg, torch.device("cuda"))
    hits = jitkern.stats()["memory_hits"]
    k2 = get_kernel(SELFTEST, cfg, torch.device("cuda"))
    assert k1 is k2 and jitkern.stats()["memory_hits"] == hits + 1
    attrs = k1.function("axpy").attributes
    assert attrs["registers"] > 0 and attrs["max_threads_per_block"] >= 256


def test_an_unloadable_cached_entry_is_dropped_and_recompiled(tmp_path, monkeypatch):
    cfg = {"dtype": "fp16", "unroll": 7}
    cap = torch.cuda.get_device_capability()
    arch = f"sm_{cap[0]}{cap[1]}"
    key = jitkern.key_of(SELFTEST, cfg, arch)
    good = jitkern.compile(SELFTEST, cfg, arch=arch)
    # a well-formed entry (checksum right) whose cubin is not a loadable image
    bad = CacheEntry(key=key, family=good.family, name=good.name, config=good.config, arch=arch,
                     nvrtc_version=good.nvrtc_version, options=good.options,
                     lowered_names=good.lowered_names, compile_seconds=0.0,
                     cubin=b"\x7fELF" + b"\0" * 200)
    SERVICE._entries[key] = bad
    before = jitkern.stats()
    x = torch.randn(4096, device="cuda", dtype=torch.float16)
    y = torch.randn(4096, device="cuda", dtype=torch.float16)
    ref = 2 * x.float() + y.float()
    axpy(y, x, 2.0, unroll=7)
    torch.cuda.synchronize()
    after = jitkern.stats()
    assert after["load_errors"] == before["load_errors"] + 1
    assert after["compiles"] == before["compiles"] + 1
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_tensors_on_a_second_gpu_launch_there_and_leave_the_current_device():
    torch.cuda.set_device(0)
    x = torch.randn(10000, device="cuda:1")
    y = torch.randn(10000, device="cuda:1")
    ref = 3 * x + y
    axpy(y, x, 3.0)
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert math.isfinite(y.sum().item())
