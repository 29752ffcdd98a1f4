"""NVRTC compilation without a GPU, and what a compile error tells the user."""

import textwrap

import pytest

import jitkern
from jitkern import toolchain
from jitkern.errors import CompileError, ToolchainError
from jitkern.family import Entry, KernelFamily, Param
from jitkern.families.selftest import SELFTEST


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JITKERN_ARCH", raising=False)
    from jitkern.service import SERVICE, KernelService

    fresh = KernelService()
    monkeypatch.setattr(jitkern.service, "SERVICE", fresh)
    yield
    if fresh._disk is not None:
        fresh._disk.close()


@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_selftest_compiles_for_hopper_without_a_gpu(arch, dtype):
    e = jitkern.compile(SELFTEST, dict(dtype=dtype, unroll=2), arch=arch)
    assert e.arch == arch
    assert e.cubin[:4] == b"\x7fELF"
    assert set(e.lowered_names) == {"axpy", "probe", "probe_packed"}
    assert e.lowered_names["axpy"].startswith("_ZN11jk_selftest4axpyI")
    assert f"--gpu-architecture={arch}" in e.options and "-DJK_UNROLL=2" in e.options
    assert e.compile_seconds > 0 and e.nvrtc_version == toolchain.nvrtc_version()


BROKEN = textwrap.dedent("""\
    #include "helper.cuh"
    __global__ void broken(float* x) {
        x[threadIdx.x] = undefined_name + JK_SCALE;
    }
    """)


def test_compile_error_carries_log_config_and_source_lines(tmp_path):
    (tmp_path / "broken.cu").write_text(BROKEN)
    (tmp_path / "helper.cuh").write_text("#pragma once\n")
    fam = KernelFamily(name="broken", source="broken.cu", source_dir=tmp_path,
                       params=(Param("scale", (1, 2)),), entries={"k": Entry("broken")})
    before = jitkern.stats()
    with pytest.raises(CompileError) as info:
        jitkern.compile(fam, dict(scale=2), arch="sm_90")
    err = info.value
    assert 'identifier "undefined_name" is undefined' in err.log
    assert err.config == {"scale": 2} and err.arch == "sm_90" and err.family == "broken"
    text = str(err)
    assert "NVRTC failed to compile broken/scale=2 for sm_90" in text
    assert "configuration: {'scale': 2}" in text
    assert ">     3 |     x[threadIdx.x] = undefined_name + JK_SCALE;" in text
    assert "      2 | __global__ void broken(float* x) {" in text  # context line
    after = jitkern.stats()
    assert after["compile_errors"] == before["compile_errors"] + 1
    assert after["errors"] == before["errors"] + 1


def test_errors_in_a_project_header_point_into_the_header(tmp_path):
    (tmp_path / "main.cu").write_text('#include "sub/h.cuh"\n__global__ void k() { f(); }\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "h.cuh").write_text("#pragma once\n__device__ void f() { int x = ; }\n")
    fam = KernelFamily(name="hdr", source="main.cu", source_dir=tmp_path, params=(),
                       entries={"k": Entry("k")})
    with pytest.raises(CompileError) as info:
        jitkern.compile(fam, {}, arch="sm_90")
    assert "sub/h.cuh:2" in str(info.value)
    assert ">     2 | __device__ void f() { int x = ; }" in str(info.value)


@pytest.mark.parametrize("text, norm", [("sm_90a", "sm_90a"), ("90", "sm_90"), ("9.0", "sm_90"),
                                         ("SM90", "sm_90"), ("sm_100a", "sm_100a")])
def test_arch_spellings(text, norm):
    assert toolchain.normalize_arch(text) == norm


def test_bad_and_unsupported_targets():
    with pytest.raises(ValueError, match="not an SM architecture; expected e.g. sm_90"):
        toolchain.normalize_arch("hopper")
    with pytest.raises(ToolchainError, match="cannot target sm_35"):
        jitkern.compile(SELFTEST, dict(dtype="fp32"), arch="sm_35")


def test_no_gpu_and_no_target_says_what_to_pass(monkeypatch):
    monkeypatch.setattr(jitkern.service, "_local_capability", lambda: None)  # as on a GPU-less box
    with pytest.raises(ToolchainError, match="pass arch= .or --arch., or set JITKERN_ARCH"):
        jitkern.compile(SELFTEST, dict(dtype="fp32"))


def test_jitkern_arch_environment_overrides(monkeypatch):
    monkeypatch.setenv("JITKERN_ARCH", "sm_90a")
    assert jitkern.compile(SELFTEST, dict(dtype="fp32")).arch == "sm_90a"


def test_arch_specific_families_get_the_a_suffix():
    fam = KernelFamily(name="wg", source="selftest.cu", params=(), entries={}, arch_specific=True)
    assert toolchain.resolve_arch(fam, "sm_90") == "sm_90a"
    assert toolchain.resolve_arch(fam, capability=(9, 0)) == "sm_90a"
    assert toolchain.resolve_arch(fam, "sm_80") == "sm_80"


def test_headers_come_from_the_wheel_first():
    inc = toolchain.cuda_include_dir()
    assert (inc / "cuda_bf16.h").is_file() and (inc / "cuda_fp8.h").is_file()


def test_a_missing_kernel_source_names_the_file(tmp_path):
    fam = KernelFamily(name="nosrc", source="absent.cu", source_dir=tmp_path, params=(),
                       entries={"k": Entry("k")})
    with pytest.raises(FileNotFoundError, match=r"kernel source 'absent.cu' not found under"):
        jitkern.compile(fam, {}, arch="sm_90")
