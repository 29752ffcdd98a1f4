"""Cache tiers with real processes and real files: reuse, single flight, corruption, read-only
directories, no HOME, the LRU cap."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, entry_files, run_py

COMPILE = """
import json, sys, time, jitkern
from jitkern.families.selftest import SELFTEST
cfg = {cfg}
start = {start}
while time.time() < start:
    time.sleep(0.001)
e = jitkern.compile(SELFTEST, cfg, arch="sm_90")
s = jitkern.stats()
s["key"] = e.key
print(json.dumps(s))
"""


def compile_code(cfg=None, start=0.0):
    return COMPILE.format(cfg=repr(cfg or {"dtype": "bf16", "unroll": 3}), start=start)


def test_second_process_reuses_the_disk_entry_with_zero_compiles(cache_env):
    first, _ = run_py(compile_code(), cache_env)
    second, _ = run_py(compile_code(), cache_env)
    assert first["compiles"] == 1 and first["disk_writes"] == 1
    assert second["compiles"] == 0 and second["disk_hits"] == 1 and second["key"] == first["key"]


def test_cold_compile_logs_one_info_line(cache_env):
    env = dict(cache_env, JITKERN_LOG="INFO")
    _, proc = run_py(compile_code(), env)
    lines = [ln for ln in proc.stderr.splitlines() if "compiled selftest/" in ln]
    assert len(lines) == 1 and "dtype=bf16,unroll=3 for sm_90 in" in lines[0]
    _, proc = run_py(compile_code(), env)
    assert "compiled" not in proc.stderr


# A family whose compile takes long enough (hundreds of ms) for 8 processes to overlap on it.
SLOW_FAMILY = """
from jitkern.family import Entry, KernelFamily, Param
SLOW = KernelFamily(name="slowfam", source="selftest.cu",
                    params=(Param("unroll", (7,)),),
                    entries={f"a{i}": Entry(f"jk_selftest::axpy<{t}>") for i, t in
                              enumerate(["float", "__half", "__nv_bfloat16"])},
                    options=("-std=c++17", "-G"))
"""


def test_eight_processes_started_together_compile_once(cache_env):
    start = time.time() + 4.0
    code = (SLOW_FAMILY + "import json, time, jitkern\n"
            f"start = {start}\n"
            "while time.time() < start: time.sleep(0.001)\n"
            "jitkern.compile(SLOW, {'unroll': 7}, arch='sm_90')\n"
            "print(json.dumps(jitkern.stats()))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=cache_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["compiles"] for r in results) == 1
    assert sum(r["disk_hits"] for r in results) == 7
    assert sum(r["lock_waits"] for r in results) >= 1  # they really did overlap


HOLD_LOCK = """
import sys, time
from pathlib import Path
from jitkern.cache.lock import key_lock
with key_lock(Path(sys.argv[1]), sys.argv[2], timeout=1) as got:
    print("held" if got else "busy", flush=True)
    time.sleep(600)
"""


def _hold_lock(cache_env, key):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK,
                               os.path.join(cache_env["JITKERN_CACHE_DIR"], "locks"), key],
                              env=cache_env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _key(cache_env, cfg):
    code = ("import json, jitkern; from jitkern.families.selftest import SELFTEST;"
            f"print(json.dumps(jitkern.key_of(SELFTEST, {cfg!r}, 'sm_90')))")
    return run_py(code, cache_env)[0]


def test_a_killed_lock_holder_does_not_stall_the_others(cache_env):
    cfg = {"dtype": "fp16", "unroll": 5}
    holder = _hold_lock(cache_env, _key(cache_env, cfg))
    env = dict(cache_env, JITKERN_LOCK_TIMEOUT="60")
    waiter = subprocess.Popen([sys.executable, "-c", compile_code(cfg)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    assert waiter.poll() is None  # really waiting on the lock
    t0 = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert time.monotonic() - t0 < 15  # released by the OS at once, far inside the 60 s timeout
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["compiles"] == 1 and stats["lock_waits"] == 1 and stats["lock_timeouts"] == 0


def test_a_hung_lock_holder_costs_at_most_the_timeout(cache_env):
    cfg = {"dtype": "fp16", "unroll": 6}
    holder = _hold_lock(cache_env, _key(cache_env, cfg))
    holder.send_signal(signal.SIGSTOP)
    try:
        env = dict(cache_env, JITKERN_LOCK_TIMEOUT="2")
        t0 = time.monotonic()
        stats, proc = run_py(compile_code(cfg), env)
        assert time.monotonic() - t0 < 20
        assert stats["compiles"] == 1 and stats["lock_timeouts"] == 1
        assert "compiling here" in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def _flip(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    i = max(0, len(data) - offset_from_end)
    data[i] ^= 0xFF
    data[i + 1] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "flip_metadata"])
def test_a_damaged_entry_is_detected_logged_and_recompiled(cache_env, damage):
    first, _ = run_py(compile_code(), cache_env)
    files = entry_files(cache_env["JITKERN_CACHE_DIR"])
    assert len(files) == 1
    f = files[0]
    if damage == "flip":
        _flip(f)
    elif damage == "flip_metadata":
        _flip(f, offset_from_end=f.stat().st_size - 20)
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    second, proc = run_py(compile_code(), cache_env)
    assert second["corrupt_entries"] == 1 and second["compiles"] == 1 and second["errors"] == 1
    assert "corrupt disk cache entry" in proc.stderr
    third, _ = run_py(compile_code(), cache_env)  # the recompiled entry replaced the bad one
    assert third["compiles"] == 0 and third["disk_hits"] == 1 and third["corrupt_entries"] == 0


def run_with_read_only(code, env, ro_dir):
    """Run ``code`` in a fresh process that sees ``ro_dir`` on a read-only filesystem.

    As root (who ignores permission bits) the directory is bind-mounted read-only in a private
    mount namespace; otherwise its permission bits are cleared."""
    if os.geteuid() == 0:
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$1" -c "$2"'
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script, str(ro_dir), sys.executable,
                               code], env=env, capture_output=True, text=True, timeout=120)
    else:
        for root, dirs, files in os.walk(ro_dir):
            os.chmod(root, 0o555)
            for f in files:
                os.chmod(os.path.join(root, f), 0o444)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_a_read_only_cache_directory_serves_its_entries_and_warns_once(cache_env):
    run_py(compile_code(), cache_env)
    code = compile_code() + (
        "e2 = jitkern.compile(SELFTEST, {'dtype': 'fp32', 'unroll': 2}, arch='sm_90')\n"
        "e3 = jitkern.compile(SELFTEST, {'dtype': 'fp16', 'unroll': 2}, arch='sm_90')\n"
        "print(json.dumps(jitkern.stats()))\n")
    stats, proc = run_with_read_only(code, cache_env, cache_env["JITKERN_CACHE_DIR"])
    assert stats["disk_hits"] == 1  # the entry already there, read without writing
    assert stats["compiles"] == 2   # the new ones, kept in memory
    assert proc.stderr.count("is not writable") == 1


def test_an_unwritable_cache_location_degrades_to_memory(cache_env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = dict(cache_env, JITKERN_CACHE_DIR=str(blocker / "cache"))
    code = compile_code() + (
        "jitkern.service.SERVICE._entries.clear()\n"
        "jitkern.compile(SELFTEST, {'dtype': 'bf16', 'unroll': 3}, arch='sm_90')\n"
        "print(json.dumps(jitkern.stats()))\n")
    stats, proc = run_py(code, env)
    assert stats["compiles"] == 2 and stats["errors"] == 0
    assert proc.stderr.count("kept in memory only") == 1


def test_unset_home_works(cache_env, tmp_path):
    env = {k: v for k, v in cache_env.items()
           if k not in ("HOME", "JITKERN_CACHE_DIR", "XDG_CACHE_HOME")}
    env["TMPDIR"] = str(tmp_path)
    code = compile_code() + ("from jitkern import settings\n"
                             "print(json.dumps(str(settings.cache_dir())))\n")
    path, _ = run_py(code, env)
    assert path.startswith(str(tmp_path)) and "jitkern-cache-" in path
    second, _ = run_py(compile_code(), env)
    assert second["compiles"] == 0 and second["disk_hits"] == 1


def test_size_cap_evicts_least_recently_used(cache_env):
    code = """
import json, jitkern
from jitkern.families.selftest import SELFTEST
from jitkern.service import SERVICE
keys = []
for unroll in range(1, 9):
    keys.append(jitkern.compile(SELFTEST, {"dtype": "fp32", "unroll": unroll}, arch="sm_90").key)
    # touch the first entry after each compile: least recently used is then the second, ...
    SERVICE.disk.get(keys[0])
disk = SERVICE.disk.cache
print(json.dumps({"present": [k in disk for k in keys], "volume": disk.volume()}))
"""
    env = dict(cache_env, JITKERN_CACHE_SIZE_LIMIT="120KB")
    out, _ = run_py(code, env)
    present = out["present"]
    assert present[0] and present[-1]          # recently used survive
    assert not all(present)                    # something was evicted
    assert not present[1]                      # and it was the least recently used one
    assert out["volume"] <= 120_000 + 40_000   # bounded near the cap (diskcache culls per write)


def test_size_limit_must_parse(cache_env):
    env = dict(cache_env, JITKERN_CACHE_SIZE_LIMIT="lots")
    _, proc = run_py(compile_code(), env, check=False)
    assert proc.returncode != 0
    assert "JITKERN_CACHE_SIZE_LIMIT: size 'lots': expected a number of bytes" in proc.stderr


def test_aot_directories_are_searched_first_and_never_written(cache_env, tmp_path):
    aot = tmp_path / "aot"
    run_py(compile_code(), dict(cache_env, JITKERN_CACHE_DIR=str(aot)))
    before = sorted(str(p) for p in aot.rglob("*"))
    env = dict(cache_env, JITKERN_CACHE_PATH=f"{tmp_path / 'missing'}:{aot}")
    stats, _ = run_with_read_only(compile_code(), env, aot)
    assert stats["aot_hits"] == 1 and stats["compiles"] == 0 and stats["disk_writes"] == 0
    assert sorted(str(p) for p in aot.rglob("*")) == before


def test_entry_metadata_that_is_not_an_object_is_corrupt():
    import struct

    from jitkern.entry import MAGIC, CacheEntry
    from jitkern.errors import CorruptEntry

    blob = MAGIC + struct.pack("<I", 6) + b"[1, 2]"
    with pytest.raises(CorruptEntry, match="metadata is not an object"):
        CacheEntry.from_bytes(blob)


def test_an_entry_stored_under_another_key_is_refused_and_recompiled(cache_env):
    code = """
import json, jitkern
from jitkern.families.selftest import SELFTEST
from jitkern.service import SERVICE
a = jitkern.compile(SELFTEST, {"dtype": "fp32", "unroll": 2}, arch="sm_90")
key_b = jitkern.key_of(SELFTEST, {"dtype": "fp32", "unroll": 3}, "sm_90")
SERVICE.disk.put(key_b, a.to_bytes())     # a valid entry, but of another configuration
b = jitkern.compile(SELFTEST, {"dtype": "fp32", "unroll": 3}, arch="sm_90")
s = jitkern.stats()
print(json.dumps([b.key == key_b, b.config["unroll"], s["corrupt_entries"], s["compiles"]]))
"""
    out, proc = run_py(code, cache_env)
    assert out == [True, 3, 1, 2]
    assert "entry belongs to another key" in proc.stderr


def test_a_bad_log_level_is_a_clear_error(cache_env):
    _, proc = run_py("import jitkern", dict(cache_env, JITKERN_LOG="LOUD"), check=False)
    assert proc.returncode != 0
    assert "JITKERN_LOG='LOUD': expected DEBUG, INFO, WARNING or ERROR" in proc.stderr
