"""The cache key: stable across processes, directories and checkouts; sensitive to every input."""

import shutil

import pytest

from conftest import ROOT, run_py
from jitkern import toolchain
from jitkern.family import Entry, KernelFamily, Param
from jitkern.service import KernelService

KEY_CODE = ("import json, jitkern; from jitkern.families.selftest import SELFTEST;"
            "print(json.dumps(jitkern.key_of(SELFTEST, {'dtype': 'bf16', 'unroll': 4}, 'sm_90a')))")


def test_key_is_identical_in_processes_started_in_different_directories(tmp_path, cache_env):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    k1, _ = run_py(KEY_CODE, cache_env, cwd=tmp_path / "a")
    k2, _ = run_py(KEY_CODE, cache_env, cwd=tmp_path / "b" / "deeper")
    assert k1 == k2 and len(k1) == 64


def family_in(root, options=("-std=c++17",)):
    return KernelFamily(name="keyfam", source="main.cu", source_dir=root, options=options,
                        params=(Param("n", (1, 2)),), entries={"k": Entry("k")})


def key(fam, config=None, arch="sm_90"):
    return KernelService().key_for(fam.specialize(config or {"n": 1}), arch)


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "main.cu").write_text('#include "inc/h.cuh"\n#include <cuda_bf16.h>\n'
                                  "__global__ void k() {}\n")
    (root / "inc").mkdir()
    (root / "inc" / "h.cuh").write_text("#pragma once\n#define H 1\n")
    return root


def test_key_has_no_absolute_paths(src, tmp_path):
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, other)
    assert key(family_in(src)) == key(family_in(other))


def test_key_changes_with_a_header_of_the_closure(src):
    before = key(family_in(src))
    (src / "inc" / "h.cuh").write_text("#pragma once\n#define H 2\n")
    assert key(family_in(src)) != before


def test_key_changes_with_the_main_source(src):
    before = key(family_in(src))
    (src / "main.cu").write_text((src / "main.cu").read_text() + "// comment\n")
    assert key(family_in(src)) != before


def test_key_changes_with_options_target_and_configuration(src):
    base = key(family_in(src))
    assert key(family_in(src, options=("-std=c++17", "-lineinfo"))) != base
    assert key(family_in(src), arch="sm_90a") != base
    assert key(family_in(src), arch="sm_100") != base
    assert key(family_in(src), config={"n": 2}) != base


def test_key_changes_with_nvrtc_version(src, monkeypatch):
    base = key(family_in(src))
    monkeypatch.setattr(toolchain, "nvrtc_version", lambda: "99.9")
    assert key(family_in(src)) != base


def test_key_changes_with_the_cuda_headers(src, tmp_path, monkeypatch):
    base = key(family_in(src))
    fake = tmp_path / "include"
    fake.mkdir()
    real = toolchain.cuda_include_dir()
    for name in ("cuda_fp16.h", "cuda_bf16.h"):
        shutil.copy(real / name, fake / name)
    (fake / "cuda_bf16.h").write_text((fake / "cuda_bf16.h").read_text() + "\n// patched\n")
    monkeypatch.setattr(toolchain, "cuda_include_dir", lambda: fake)
    toolchain.header_digest.cache_clear()
    try:
        assert key(family_in(src)) != base
    finally:
        toolchain.header_digest.cache_clear()


def test_header_digest_follows_includes_of_cuda_headers():
    direct = toolchain.header_digest(("cuda_bf16.h",))
    assert direct != toolchain.header_digest(("cuda_fp16.h",))
    assert len(direct) == 64
    assert toolchain.header_digest(("no_such_header.h",)) != toolchain.header_digest(("other.h",))
    assert (ROOT / "kernels_src" / "selftest.cu").is_file()


def test_header_digest_memo_is_reused_until_a_header_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(toolchain, "_MEMO", toolchain._Memo())
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "cuda_fp16.h").write_text('#include "cuda_fp16.hpp"\n')
    (inc / "cuda_fp16.hpp").write_text("// v1\n")
    monkeypatch.setattr(toolchain, "cuda_include_dir", lambda: inc)
    toolchain.header_digest.cache_clear()
    try:
        first = toolchain.header_digest(("cuda_fp16.h",))
        memo = (tmp_path / "cache" / "toolchain.json").read_text()
        assert "cuda_fp16.hpp" in memo  # the transitive include is stamped too
        toolchain.header_digest.cache_clear()
        monkeypatch.setattr(toolchain, "_header_digest", None)  # a memo hit must not recompute
        assert toolchain.header_digest(("cuda_fp16.h",)) == first
        monkeypatch.undo()
        monkeypatch.setenv("JITKERN_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setattr(toolchain, "cuda_include_dir", lambda: inc)
        (inc / "cuda_fp16.hpp").write_text("// v2, longer\n")  # size and mtime change
        toolchain.header_digest.cache_clear()
        assert toolchain.header_digest(("cuda_fp16.h",)) != first
    finally:
        toolchain.header_digest.cache_clear()


def test_a_process_reading_the_cache_does_not_load_nvrtc(cache_env):
    code = ("import json, sys, jitkern; from jitkern.families.selftest import SELFTEST;"
            "jitkern.compile(SELFTEST, {'dtype': 'fp16'}, arch='sm_90');"
            "print(json.dumps(['cupy_backends.cuda.libs.nvrtc' in sys.modules,"
            " jitkern.stats()['compiles']]))")
    assert run_py(code, cache_env)[0] == [True, 1]
    assert run_py(code, cache_env)[0] == [False, 0]


def test_nvrtc_version_of_the_wheel_needs_no_library_load():
    import sys

    lib = toolchain._nvrtc_library_file()
    if lib is None:
        pytest.skip("NVRTC does not come from the nvidia-cuda-nvrtc wheel here")
    assert toolchain._wheel_nvrtc_version(lib) == "{}.{}".format(*toolchain.nvrtc().getVersion())
    assert "cupy_backends.cuda.libs.nvrtc" in sys.modules  # (loaded above, for the comparison)
