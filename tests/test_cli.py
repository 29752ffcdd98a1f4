"""``jitkern warmup`` through its real entry point, in subprocesses, on temporary cache dirs:
the default set cold then cached, parallel = serial, dry run, targets, presets, Ctrl-C."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HAS_GPU, ROOT, entry_files

SELFTEST_GRID = """
[[kernel]]
family = "selftest"
dtype = ["fp32", "fp16", "bf16"]
unroll = [1, 2, 3, 4]
"""


def cli(env, *args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "jitkern.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


def cli_json(env, *args, expect=0, **kw):
    proc = cli(env, *args, **kw)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def registered():
    """{family: number of distinct warm-up configurations} of the registered families."""
    out = subprocess.run([sys.executable, "-c", "import json, jitkern; print(json.dumps("
                          "{f.name: len({f.canonical(c) for c in f.warmup}) "
                          "for f in jitkern.registered()}))"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_default_set_cold_then_all_cached_with_no_compile(cache_env):
    total = sum(registered().values())
    first = cli_json(cache_env, "warmup", "--arch", "sm_90", "--json")
    assert first["failed"] == 0, first["failures"]
    assert first["compiled"] == total and first["cached"] == 0 and first["total"] == total
    assert first["bytes"] > 0 and first["processes"] >= 1
    files = entry_files(cache_env["JITKERN_CACHE_DIR"])
    assert len(files) == total
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = cli_json(cache_env, "warmup", "--arch", "sm_90", "--json")
    assert second["compiled"] == 0 and second["cached"] == total and second["failed"] == 0
    assert second["bytes"] == first["bytes"]
    assert {f: f.stat().st_mtime_ns for f in entry_files(cache_env["JITKERN_CACHE_DIR"])} == stamps


def test_human_summary_and_plain_progress(cache_env, tmp_path):
    m = write(tmp_path, "m.toml", SELFTEST_GRID)
    proc = cli(cache_env, "warmup", "--arch", "sm_90", "--manifest", m, "-j", "1")
    assert proc.returncode == 0, proc.stderr
    assert "already cached" in proc.stdout and "total" in proc.stdout
    assert "selftest" in proc.stdout and "12" in proc.stdout
    # stderr is not a terminal here: one plain line per kernel, no bar or escape codes
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 12 and lines[-1].startswith("[12/12] compiled")
    assert "\x1b[" not in proc.stderr
    again = cli(cache_env, "warmup", "--arch", "sm_90", "--manifest", m, "-q")
    assert again.returncode == 0 and again.stderr == ""


def _ls(env):
    return {(r["name"], r["arch"], r["key"]) for r in cli_json(env, "cache", "ls", "--json")}


def test_parallel_warmup_equals_serial(cache_env, tmp_path):
    grid = SELFTEST_GRID
    if "spec_dec_attention" in registered():
        grid += ('\n[[kernel]]\nfamily = "spec_dec_attention"\nhead_dim = 128\ndtype = "bf16"\n'
                 'kv_dtype = "bf16"\nkv_layout = "NHD"\npage_size = [16, 64]\nmode = "chain"\n'
                 'q_tile = [16, 32]\n')
    m = write(tmp_path, "m.toml", grid)
    serial_env = dict(cache_env, JITKERN_CACHE_DIR=str(tmp_path / "serial"))
    par_env = dict(cache_env, JITKERN_CACHE_DIR=str(tmp_path / "parallel"))
    s = cli_json(serial_env, "warmup", "--arch", "sm_90", "--manifest", m, "-j", "1", "--json")
    p = cli_json(par_env, "warmup", "--arch", "sm_90", "--manifest", m, "-j", "3", "--json")
    assert s["processes"] == 1 and p["processes"] == 3
    assert s["failed"] == p["failed"] == 0
    assert s["compiled"] == p["compiled"] == s["total"] == p["total"]
    serial, parallel = _ls(serial_env), _ls(par_env)
    assert len(serial) == s["total"] and serial == parallel


def test_dry_run_lists_and_compiles_nothing(cache_env, tmp_path):
    m = write(tmp_path, "m.toml", SELFTEST_GRID)
    d = cli_json(cache_env, "warmup", "--arch", "sm_90", "--manifest", m, "--dry-run", "--json")
    assert d["to_compile"] == 12 and d["cached"] == 0 and len(d["jobs"]) == 12
    assert {j["name"] for j in d["jobs"]} == {f"selftest/dtype={t},unroll={u}"
                                              for t in ("fp32", "fp16", "bf16") for u in (1, 2, 3, 4)}
    assert entry_files(cache_env["JITKERN_CACHE_DIR"]) == []
    cli_json(cache_env, "warmup", "--arch", "sm_90", "--family", "selftest", "--json")
    d = cli_json(cache_env, "warmup", "--arch", "sm_90", "--manifest", m, "--dry-run", "--json")
    assert d["to_compile"] == 10 and d["cached"] == 2  # the built-in selftest set: unroll=1
    text = cli(cache_env, "warmup", "--arch", "sm_90", "--manifest", m, "--dry-run")
    assert "10 to compile, 2 already cached" in text.stdout


def test_arch_names_the_gpu_and_targets_follow_the_run_time(cache_env):
    d = cli_json(cache_env, "warmup", "--arch", "sm_90a", "--arch", "sm_100", "--family",
                 "selftest", "--dry-run", "--json")
    # selftest uses no arch-specific instructions: the run time asks for sm_90 on an H100
    assert sorted({j["arch"] for j in d["jobs"]}) == ["sm_100", "sm_90"] and d["to_compile"] == 4
    d = cli_json(cache_env, "warmup", "--arch", "sm_90a", "--exact-arch", "--family", "selftest",
                 "--dry-run", "--json")
    assert {j["arch"] for j in d["jobs"]} == {"sm_90a"}
    env = dict(cache_env, JITKERN_ARCH="sm_90a")  # used exactly at run time, so here too
    d = cli_json(env, "warmup", "--family", "selftest", "--dry-run", "--json")
    assert {j["arch"] for j in d["jobs"]} == {"sm_90a"}


def test_a_key_warmed_by_the_cli_is_the_one_the_service_looks_up(cache_env):
    cli_json(cache_env, "warmup", "--arch", "sm_90a", "--family", "selftest", "--json")
    code = ("import json, jitkern; from jitkern.families.selftest import SELFTEST\n"
            "jitkern.compile(SELFTEST, {'dtype': 'bf16'}, arch='sm_90')\n"
            "print(json.dumps(jitkern.stats()))")
    out = subprocess.run([sys.executable, "-c", code], env=cache_env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.splitlines()[-1])
    assert stats["compiles"] == 0 and stats["disk_hits"] == 1


@pytest.mark.skipif(HAS_GPU, reason="checks the message given when there is no GPU")
def test_no_gpu_and_no_arch_says_what_to_pass(cache_env):
    proc = cli(cache_env, "warmup")
    assert proc.returncode == 2
    assert "no GPU here and no target given" in proc.stderr and "--arch sm_90a" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--arch", "hopper"], "--arch: target 'hopper' is not an SM architecture"),
    (["--arch", "sm_50"], "NVRTC"),
    (["--arch", "sm_90", "-j", "0"], "-j must be at least 1"),
    (["--arch", "sm_90", "--family", "nope"], "--family: unknown family 'nope'; registered:"),
    (["--arch", "sm_90", "--tp", "8"], "--tp applies to --preset"),
    (["--arch", "sm_90", "--preset", "gpt-5"], "unknown preset 'gpt-5'; presets: nemotron-h-8b"),
    (["--arch", "sm_90", "--preset", "llama-3.1-8b", "--tp", "3"],
     "preset llama-3.1-8b: --tp 3 does not divide the 32 attention query heads"),
    (["--arch", "sm_90", "--manifest", "/nonexistent/m.toml"], "cannot read manifest"),
])
def test_argument_errors_name_the_argument(cache_env, args, message):
    proc = cli(cache_env, "warmup", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert entry_files(cache_env["JITKERN_CACHE_DIR"]) == []


def test_preset_dry_run_and_tp(cache_env):
    d = cli_json(cache_env, "warmup", "--preset", "llama-3.1-70b", "--arch", "sm_90a",
                 "--dry-run", "--json")
    fams = {j["family"] for j in d["jobs"]}
    assert fams <= {"spec_dec_attention"} and d["to_compile"] == len(d["jobs"]) > 0
    if "spec_dec_attention" not in registered():
        pytest.skip("spec_dec_attention is not registered")
    # 70B at TP=8: G = 8; one query token -> 8 rows -> 16-row tile; trees use 64-row tiles
    decode = [j for j in d["jobs"] if j["config"]["mode"] == "decode"]
    assert {j["config"]["q_tile"] for j in decode} == {16}
    assert {j["config"]["page_size"] for j in d["jobs"]} == {16, 64}
    assert {j["config"]["kv_dtype"] for j in d["jobs"]} == {"bf16", "fp8_e4m3"}


def test_help_has_examples_for_every_command(cache_env):
    for args in (["--help"], ["warmup", "--help"], ["cache", "--help"], ["info", "--help"],
                 ["presets", "--help"]) + tuple(["cache", c, "--help"] for c in
                                                ("ls", "stats", "verify", "prune", "clear",
                                                 "export", "import")):
        proc = cli(cache_env, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "example" in proc.stdout and "jitkern" in proc.stdout, args


def test_the_jitkern_script_runs(cache_env):
    script = Path(sys.executable).parent / "jitkern"
    if not script.exists():
        pytest.skip("the jitkern console script is not installed (pip install -e .)")
    proc = subprocess.run([str(script), "warmup", "--arch", "sm_90", "--family", "selftest",
                           "--json"], env=cache_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compiled"] == 2


def _held_locks(cache_dir):
    held = []
    for p in (Path(cache_dir) / "locks").glob("*.lock"):
        fd = os.open(p, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held.append(p)
        finally:
            os.close(fd)
    return held


def _slow_grid():
    if "spec_dec_attention" in registered():  # about half a second per kernel
        return ('[[kernel]]\nfamily = "spec_dec_attention"\nhead_dim = 128\ndtype = "bf16"\n'
                'kv_dtype = ["bf16", "fp8_e4m3"]\nkv_layout = "NHD"\npage_size = [16, 64]\n'
                'mode = ["decode", "tree"]\nq_tile = 64\n')  # 8 kernels
    pytest.skip("needs a family whose kernels take long enough to interrupt")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_interrupted_warmup_leaves_a_consistent_cache_and_a_rerun_completes(cache_env, tmp_path, jobs):
    m = write(tmp_path, "slow.toml", _slow_grid())
    args = [sys.executable, "-m", "jitkern.cli", "warmup", "--arch", "sm_90", "--manifest", m,
            "-j", jobs]
    proc = subprocess.Popen(args, env=cache_env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    done = 0
    for line in proc.stderr:  # plain progress: one line per finished kernel
        if " compiled " in line:
            done += 1
        if done == 2:
            break
    assert done == 2, "the warm-up finished or failed before it could be interrupted"
    time.sleep(0.2)  # land mid-compile of the next ones
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Run the same command again to continue" in err
    cache_dir = cache_env["JITKERN_CACHE_DIR"]
    assert _held_locks(cache_dir) == []
    v = cli_json(cache_env, "cache", "verify", "--json")
    assert v["bad"] == 0 and 2 <= v["checked"] < 8
    rerun = cli_json(cache_env, "warmup", "--arch", "sm_90", "--manifest", m, "-j", jobs, "--json")
    assert rerun["failed"] == 0 and rerun["total"] == 8
    assert rerun["cached"] >= v["checked"] and rerun["compiled"] + rerun["cached"] == 8
    final = cli_json(cache_env, "warmup", "--arch", "sm_90", "--manifest", m, "--json")
    assert final["compiled"] == 0 and final["cached"] == 8
    v = cli_json(cache_env, "cache", "verify", "--json")
    assert v["bad"] == 0 and v["checked"] == 8


def test_progress_bar_on_a_terminal_shows_the_kernel_being_compiled(cache_env, tmp_path):
    import pty

    m = write(tmp_path, "m.toml", SELFTEST_GRID)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "jitkern.cli", "warmup", "--arch", "sm_90",
                             "--manifest", m, "-j", "2"], env=cache_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.wait(timeout=120)
    err = b"".join(chunks).decode()
    assert proc.returncode == 0, err
    assert "\r\x1b[K[" in err and "12/12" in err
    assert "compiling selftest/dtype=" in err and "(sm_90)" in err
    assert not any(ln.startswith("[1/12] compiled") for ln in err.splitlines())  # no plain lines
    assert err.endswith("\r\x1b[K")  # the bar is cleared before the summary


def test_an_unwritable_cache_is_an_error_not_a_silent_memory_only_warmup(cache_env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = dict(cache_env, JITKERN_CACHE_DIR=str(blocker / "cache"))
    proc = cli(env, "warmup", "--arch", "sm_90", "--family", "selftest")
    assert proc.returncode == 2
    assert f"the cache directory {blocker / 'cache'} is not writable" in proc.stderr
    assert "set JITKERN_CACHE_DIR to a writable directory" in proc.stderr
