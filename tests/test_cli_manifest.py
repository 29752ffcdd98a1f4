"""Warm-up manifests (TOML and JSON) through ``jitkern warmup --manifest``: product expansion,
and errors that point at the place in the file."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, entry_files


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "jitkern.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def dry_run(env, path):
    proc = cli(env, "warmup", "--arch", "sm_90", "--manifest", str(path), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


GOOD_TOML = """\
# two tables: a 3 x 2 grid and a single configuration
arch = ["sm_90"]

[[kernel]]
family = "selftest"
dtype = ["fp32", "fp16", "bf16"]
unroll = [2, 4]

[[kernel]]
family = "selftest"
dtype = "bf16"
"""


def test_toml_grids_expand_as_a_product(cache_env, tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(GOOD_TOML)
    d = dry_run(cache_env, p)
    names = sorted(j["name"] for j in d["jobs"])
    assert names == sorted([f"selftest/dtype={t},unroll={u}" for t in ("fp32", "fp16", "bf16")
                            for u in (2, 4)] + ["selftest/dtype=bf16,unroll=1"])  # default unroll
    assert all(j["source"] == str(p) for j in d["jobs"])


def test_json_manifest_and_its_arch_are_used(cache_env, tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"arch": "sm_100", "kernel": [
        {"family": "selftest", "dtype": ["fp32", "bf16"], "unroll": [1, 8]}]}, indent=2))
    proc = cli(cache_env, "warmup", "--manifest", str(p), "--json")  # no --arch: the manifest's
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["compiled"] == 4 and out["targets"] == ["sm_100"]
    assert len(entry_files(cache_env["JITKERN_CACHE_DIR"])) == 4


def test_duplicates_across_tables_collapse(cache_env, tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('[[kernel]]\nfamily = "selftest"\ndtype = ["fp32", "bf16"]\n\n'
                 '[[kernel]]\nfamily = "selftest"\ndtype = "bf16"\nunroll = 1\n')
    assert len(dry_run(cache_env, p)["jobs"]) == 2


def test_skip_invalid_drops_rejected_combinations(cache_env, tmp_path):
    fams = subprocess.run([sys.executable, "-c", "import jitkern; print(' '.join(f.name for f in "
                           "jitkern.registered()))"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()
    if "spec_dec_attention" not in fams:
        pytest.skip("needs a family with cross-parameter rules (spec_dec_attention)")
    grid = ('[[kernel]]\nfamily = "spec_dec_attention"\nhead_dim = 128\ndtype = ["fp16", "bf16"]\n'
            'kv_dtype = ["fp16", "bf16", "fp8_e4m3"]\nkv_layout = "NHD"\npage_size = 16\n'
            'mode = "decode"\nq_tile = 16\n')
    p = tmp_path / "m.toml"
    p.write_text(grid)
    proc = cli(cache_env, "warmup", "--arch", "sm_90", "--manifest", str(p), "--dry-run")
    assert proc.returncode == 2
    assert f"{p}:1: kernel #1 (spec_dec_attention): the combination" in proc.stderr
    assert "must equal dtype" in proc.stderr and "skip_invalid = true" in proc.stderr
    p.write_text(grid + "skip_invalid = true\n")
    jobs = dry_run(cache_env, p)["jobs"]
    # fp16/fp16, fp16/fp8, bf16/bf16, bf16/fp8: the mixed 16-bit pairs are dropped
    assert sorted((j["config"]["dtype"], j["config"]["kv_dtype"]) for j in jobs) == [
        ("bf16", "bf16"), ("bf16", "fp8_e4m3"), ("fp16", "fp16"), ("fp16", "fp8_e4m3")]


TOML_ERRORS = [
    # (manifest text, expected message fragments); {p} is the file path
    ('[[kernel]]\nfamily = "selftest"\ndtype = "fp32"\n\n[[kernel]]\nfamily = "mamba3"\n',
     ["{p}:6: kernel #2: unknown family 'mamba3'", "registered:", "selftest"]),
    ('[[kernel]]\nfamily = "selftset"\n',
     ["{p}:2: kernel #1: unknown family 'selftset' (did you mean 'selftest'?)"]),
    ('[[kernel]]\nfamily = "selftest"\ndtype = "fp32"\nunrol = [1, 2]\n',
     ["{p}:4: kernel #1 (selftest): unknown parameter 'unrol' (did you mean 'unroll'?)",
      "parameters of selftest: dtype, unroll"]),
    ('[[kernel]]\nfamily = "selftest"\n\ndtype = ["fp32", "fp64"]\n',
     ["{p}:4: kernel #1 (selftest): parameter 'dtype' = 'fp64' is not allowed",
      "allowed values: 'fp32', 'fp16', 'bf16'"]),
    ('[[kernel]]\nfamily = "selftest"\ndtype = "fp32"\nunroll = [1, 9]\n',
     ["{p}:4: kernel #1 (selftest): parameter 'unroll' = 9 is not allowed",
      "allowed values: integers from 1 to 8"]),
    ('[[kernel]]\nfamily = "selftest"\ndtype = "fp32"\nunroll = "2"\n',
     ["{p}:4:", "parameter 'unroll' = '2' is not allowed"]),
    ('[[kernel]]\nfamily = "selftest"\nunroll = 2\n',
     ["{p}:1: kernel #1 (selftest): parameter 'dtype' is missing (no default)"]),
    ('[[kernel]]\nfamily = "selftest"\ndtype = []\n',
     ["{p}:3: kernel #1 (selftest): parameter 'dtype' has an empty list"]),
    ('[[kernel]]\nfamily = "selftest"\ndtype = "fp32"\nskip_invalid = "yes"\n',
     ["{p}:4:", "skip_invalid must be true or false"]),
    ('kernels = []\n', ["{p}:1: unknown top-level key 'kernels'", "expected 'kernel'"]),
    ('arch = 90\n[[kernel]]\nfamily = "selftest"\ndtype = "fp32"\n',
     ["{p}:1: 'arch' must be a target or a list of targets"]),
    ('# nothing here\n', ["{p}: no kernels listed; add [[kernel]] tables"]),
    ('[[kernel]]\nfamily = "selftest"\ndtype = "fp32\n', ["{p}:3: not valid TOML"]),
    ('[[kernel]]\nfamily = "selftest"\ndtype = "fp32"\ndtype = "bf16"\n', ["{p}:4: not valid TOML"]),
]


def _manifest_error(cache_env, tmp_path, name, text, fragments):
    """``warmup --manifest`` on a bad file: exit 2, every fragment in stderr (``{p}`` = the
    file's path), no traceback, nothing compiled."""
    p = tmp_path / name
    p.write_text(text)
    proc = cli(cache_env, "warmup", "--arch", "sm_90", "--manifest", str(p))
    assert proc.returncode == 2, proc.stderr
    for f in fragments:
        assert f.format(p=p) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert entry_files(cache_env["JITKERN_CACHE_DIR"]) == []  # nothing compiled


@pytest.mark.parametrize("text, fragments", TOML_ERRORS)
def test_toml_errors_point_at_the_place(cache_env, tmp_path, text, fragments):
    _manifest_error(cache_env, tmp_path, "bad.toml", text, fragments)


JSON_ERRORS = [
    ('{\n  "kernel": [\n    {"family": "selftest", "dtype": "fp32"},\n    {\n'
     '      "dtype": "bf16",\n      "family": "selftest",\n      "unroll": 0\n    }\n  ]\n}\n',
     ["{p}:7: kernel #2 (selftest): parameter 'unroll' = 0 is not allowed"]),
    ('{\n  "kernel": [\n    {\n      "headdim": 64,\n      "family": "spec_dec_attention"\n'
     '    }\n  ]\n}\n', ["{p}:4: kernel #1 (spec_dec_attention): unknown parameter 'headdim' "
                         "(did you mean 'head_dim'?)"]),
    ('{"kernel": [{"family": "selftest", "dtype": "fp32"},]}\n', ["{p}:1: not valid JSON"]),
    ('{"kernel": ["selftest"]}\n', ["kernel #1 must be a table of parameters, got str"]),
]


@pytest.mark.parametrize("text, fragments", JSON_ERRORS)
def test_json_errors_point_at_the_place(cache_env, tmp_path, text, fragments):
    _manifest_error(cache_env, tmp_path, "bad.json", text, fragments)
