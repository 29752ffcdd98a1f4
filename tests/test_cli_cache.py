"""``jitkern cache ...`` and ``jitkern info`` through the real entry point on temporary caches:
ls with hits and filters, stats, verify, prune bounds, clear, export -> clear -> import."""

import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import HAS_GPU, ROOT, entry_files


def cli(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "jitkern.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kw)


def cli_json(env, *args, expect=0):
    proc = cli(env, *args)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm(env, tmp_path, unrolls=(1, 2, 3, 4), dtypes=("fp32", "bf16")):
    m = tmp_path / "warm.toml"
    m.write_text(f'[[kernel]]\nfamily = "selftest"\ndtype = {json.dumps(list(dtypes))}\n'
                 f'unroll = {json.dumps(list(unrolls))}\n')
    out = cli_json(env, "warmup", "--arch", "sm_90", "--manifest", str(m), "--json", "-j", "1")
    assert out["failed"] == 0
    return out, str(m)


def ls(env, *args):
    return cli_json(env, "cache", "ls", "--json", *args)


def test_ls_lists_names_targets_sizes_and_counts_hits(cache_env, tmp_path):
    warm(cache_env, tmp_path, unrolls=(1, 2))
    rows = ls(cache_env)
    assert sorted(r["name"] for r in rows) == [
        "selftest/dtype=bf16,unroll=1", "selftest/dtype=bf16,unroll=2",
        "selftest/dtype=fp32,unroll=1", "selftest/dtype=fp32,unroll=2"]
    assert all(r["arch"] == "sm_90" and r["size"] > 1000 and r["hits"] == 0 and r["used"] > 0
               for r in rows)
    # two processes load one kernel from disk: two hits on that entry only
    code = ("import jitkern; from jitkern.families.selftest import SELFTEST\n"
            "jitkern.compile(SELFTEST, {'dtype': 'bf16', 'unroll': 2}, arch='sm_90')\n")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=cache_env, cwd=ROOT, check=True)
    hits = {r["name"]: r["hits"] for r in ls(cache_env)}
    assert hits.pop("selftest/dtype=bf16,unroll=2") == 2 and set(hits.values()) == {0}
    assert [r["name"] for r in ls(cache_env, "--sort", "hits")][0] == "selftest/dtype=bf16,unroll=2"
    assert {r["name"] for r in ls(cache_env, "--grep", "unroll=2", "--family", "selftest")} == {
        "selftest/dtype=bf16,unroll=2", "selftest/dtype=fp32,unroll=2"}
    assert ls(cache_env, "--arch", "sm_100") == [] and len(ls(cache_env, "--arch", "90")) == 4
    text = cli(cache_env, "cache", "ls")
    assert "selftest/dtype=fp32,unroll=1" in text.stdout and "4 entries" in text.stdout


def test_commands_on_a_missing_cache_do_not_create_it(cache_env, tmp_path):
    d = Path(cache_env["JITKERN_CACHE_DIR"])
    assert ls(cache_env) == []
    s = cli_json(cache_env, "cache", "stats", "--json")
    assert s["entries"] == 0 and s["exists"] is False
    v = cli_json(cache_env, "cache", "verify", "--json")
    assert v["checked"] == 0 and v["bad"] == 0
    assert "nothing to clear" in cli(cache_env, "cache", "clear", "--yes").stdout
    assert not d.exists()


def test_stats_totals_per_family_and_remote_state(cache_env, tmp_path):
    warm(cache_env, tmp_path)
    s = cli_json(cache_env, "cache", "stats", "--json")
    rows = ls(cache_env)
    assert s["entries"] == 8 and s["bytes"] == sum(r["size"] for r in rows)
    assert s["by_family"] == [{"family": "selftest", "arch": "sm_90", "entries": 8,
                               "bytes": s["bytes"], "hits": 0}]
    assert s["remote"] == {"configured": False} and s["volume"] >= s["bytes"]
    # a remote tier that cannot be reached fails open: stats still answers
    env = dict(cache_env, JITKERN_REMOTE_CACHE="redis://127.0.0.1:1/0")
    s = cli_json(env, "cache", "stats", "--json")
    assert s["remote"]["configured"] is True and s["entries"] == 8
    text = cli(cache_env, "cache", "stats").stdout
    assert "8 entries" in text and "remote: not configured" in text


def test_verify_finds_and_drops_a_corrupted_entry(cache_env, tmp_path):
    _, manifest = warm(cache_env, tmp_path)
    files = entry_files(cache_env["JITKERN_CACHE_DIR"])
    victim = files[3]
    data = bytearray(victim.read_bytes())
    data[-50] ^= 0xFF
    victim.write_bytes(bytes(data))
    kept = cli_json(cache_env, "cache", "verify", "--keep", "--json", expect=1)
    assert kept["checked"] == 8 and kept["bad"] == 1 and kept["dropped"] == 0
    assert "SHA-256 mismatch" in kept["bad_entries"][0]["problem"]
    proc = cli(cache_env, "cache", "verify")
    assert proc.returncode == 1 and "BAD selftest/" in proc.stdout and "(dropped)" in proc.stdout
    again = cli_json(cache_env, "cache", "verify", "--json")
    assert again["checked"] == 7 and again["bad"] == 0 and again["stale"] == 0
    out = cli_json(cache_env, "warmup", "--arch", "sm_90", "--manifest", manifest, "--json")
    assert out["compiled"] == 1 and out["cached"] == 7


def test_warmup_drops_and_recompiles_a_damaged_entry(cache_env, tmp_path):
    _, manifest = warm(cache_env, tmp_path)
    victim = entry_files(cache_env["JITKERN_CACHE_DIR"])[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    out = cli_json(cache_env, "warmup", "--arch", "sm_90", "--manifest", manifest, "--json")
    assert out["dropped_corrupt"] == 1 and out["compiled"] == 1 and out["cached"] == 7
    assert cli_json(cache_env, "cache", "verify", "--json")["bad"] == 0


def test_verify_removes_orphan_value_files(cache_env, tmp_path):
    warm(cache_env, tmp_path, unrolls=(1,))
    d = Path(cache_env["JITKERN_CACHE_DIR"])
    orphan = d / "ab" / "cd" / ("0" * 28 + ".val")  # what a kill between file and row leaves
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"JKC1 half an entry")
    fresh = d / "ab" / "cd" / ("1" * 28 + ".val")  # a write in flight elsewhere: left alone
    fresh.write_bytes(b"JKC1 in flight")
    old = time.time() - 3600
    import os

    os.utime(orphan, (old, old))
    v = cli_json(cache_env, "cache", "verify", "--json")
    assert v["orphan_files"] == 1 and v["bad"] == 0 and v["checked"] == 2
    assert not orphan.exists() and fresh.exists()


def _set_used(cache_dir, times: dict):
    con = sqlite3.connect(Path(cache_dir) / "cache.db")
    with con:
        for key, t in times.items():
            con.execute("UPDATE Cache SET access_time = ? WHERE key = ?", (t, key))
    con.close()


def test_prune_honours_its_bounds(cache_env, tmp_path):
    warm(cache_env, tmp_path)
    rows = sorted(ls(cache_env), key=lambda r: r["name"])
    now = time.time()
    # entry i was last used i days ago
    _set_used(cache_env["JITKERN_CACHE_DIR"], {r["key"]: now - i * 86400 for i, r in enumerate(rows)})
    dry = cli_json(cache_env, "cache", "prune", "--older-than", "5.5d", "--dry-run", "--json")
    assert dry["dropped"] == 2 and len(ls(cache_env)) == 8
    out = cli_json(cache_env, "cache", "prune", "--older-than", "5.5d", "--json")
    assert out["dropped"] == 2 and out["kept"] == 6
    left = {r["key"] for r in ls(cache_env)}
    assert left == {r["key"] for r in rows[:6]}
    # keep what fits in the size of the three most recently used
    bound = sum(r["size"] for r in rows[:3])
    out = cli_json(cache_env, "cache", "prune", "--max-size", str(bound), "--json")
    left = ls(cache_env)
    assert {r["key"] for r in left} == {r["key"] for r in rows[:3]}
    assert sum(r["size"] for r in left) <= bound and out["kept_bytes"] <= bound
    out = cli_json(cache_env, "cache", "prune", "--max-size", "1", "--json")
    assert out["kept"] == 0 and ls(cache_env) == []


@pytest.mark.parametrize("args, message", [
    ([], "prune needs a bound: --max-size SIZE, --older-than AGE and/or --stale"),
    (["--max-size", "lots"], "--max-size: size 'lots': expected a number of bytes"),
    (["--older-than", "soon"], "--older-than: duration 'soon': expected a number with s, m, h, d or w"),
])
def test_prune_argument_errors(cache_env, args, message):
    proc = cli(cache_env, "cache", "prune", *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_prune_stale_drops_entries_this_installation_never_uses(cache_env, tmp_path):
    warm(cache_env, tmp_path, unrolls=(1,))
    # an entry of the same family built from other sources: its key differs from today's
    code = """
import jitkern
from jitkern.service import SERVICE
from jitkern.families.selftest import SELFTEST
e = jitkern.compile(SELFTEST, {"dtype": "fp16"}, arch="sm_90")
e.key = "f" * 64
SERVICE.disk.put(e.key, e.to_bytes())
"""
    subprocess.run([sys.executable, "-c", code], env=cache_env, cwd=ROOT, check=True)
    assert cli_json(cache_env, "cache", "verify", "--json")["stale"] == 1
    out = cli_json(cache_env, "cache", "prune", "--stale", "--json")
    assert out["dropped"] == 1 and out["entries"][0]["key"] == "f" * 64
    assert len(ls(cache_env)) == 3  # fp32, bf16 and the fp16 compiled under its real key


def test_clear_asks_unless_yes(cache_env, tmp_path):
    warm(cache_env, tmp_path, unrolls=(1,))
    proc = cli(cache_env, "cache", "clear", stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "without confirmation: stdin is not a terminal; pass --yes" in proc.stderr
    assert len(ls(cache_env)) == 2
    proc = cli(cache_env, "cache", "clear", "--yes")
    assert proc.returncode == 0 and "removed 2 entries" in proc.stdout
    assert ls(cache_env) == [] and entry_files(cache_env["JITKERN_CACHE_DIR"]) == []
    assert list((Path(cache_env["JITKERN_CACHE_DIR"]) / "locks").glob("*.lock")) == []


def test_export_clear_import_then_warmup_compiles_nothing(cache_env, tmp_path):
    first, manifest = warm(cache_env, tmp_path)
    bundle = tmp_path / "kernels.jkb"
    ex = cli_json(cache_env, "cache", "export", str(bundle), "--json")
    assert ex["entries"] == 8 and bundle.is_file() and ex["targets"] == ["sm_90"]
    cli(cache_env, "cache", "clear", "--yes")
    assert ls(cache_env) == []
    im = cli_json(cache_env, "cache", "import", str(bundle), "--arch", "sm_90a", "--json")
    assert im["imported"] == 8 and im["already_present"] == 0 and im["unusable_here"] == 0
    assert im["target_checked"] is True
    out = cli_json(cache_env, "warmup", "--arch", "sm_90", "--manifest", manifest, "--json")
    assert out["compiled"] == 0 and out["cached"] == 8
    again = cli_json(cache_env, "cache", "import", str(bundle), "--json")
    assert again["imported"] == 0 and again["already_present"] == 8
    # another machine: a fresh cache directory fed only by the bundle
    other = dict(cache_env, JITKERN_CACHE_DIR=str(tmp_path / "other"))
    cli_json(other, "cache", "import", str(bundle), "--json")
    out = cli_json(other, "warmup", "--arch", "sm_90", "--manifest", manifest, "--json")
    assert out["compiled"] == 0 and out["cached"] == 8


def test_export_filters(cache_env, tmp_path):
    warm(cache_env, tmp_path, unrolls=(1,))
    ex = cli_json(cache_env, "cache", "export", str(tmp_path / "b.jkb"), "--arch", "sm_100", "--json")
    assert ex["entries"] == 0
    ex = cli_json(cache_env, "cache", "export", str(tmp_path / "b.jkb"), "--family", "selftest",
                  "--json")
    assert ex["entries"] == 2


def _rewrite(bundle: Path, out: Path, change):
    """Copy a bundle, passing (manifest, {name: bytes}) through ``change``."""
    with tarfile.open(bundle) as tar:
        manifest = json.load(tar.extractfile("jitkern-bundle.json"))
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                 if m.name != "jitkern-bundle.json"}
    manifest, files = change(manifest, files)
    with tarfile.open(out, "w:gz") as tar:
        for name, data in list(files.items()) + [("jitkern-bundle.json",
                                                   json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _exported(cache_env, tmp_path):
    warm(cache_env, tmp_path, unrolls=(1, 2))
    bundle = tmp_path / "good.jkb"
    cli_json(cache_env, "cache", "export", str(bundle), "--json")
    cli(cache_env, "cache", "clear", "--yes")
    return bundle


def test_import_refuses_a_damaged_bundle_and_writes_nothing(cache_env, tmp_path):
    bundle = _exported(cache_env, tmp_path)

    def flip(manifest, files):
        name = sorted(files)[1]
        data = bytearray(files[name])
        data[-10] ^= 1
        files[name] = bytes(data)
        return manifest, files

    bad = _rewrite(bundle, tmp_path / "bad.jkb", flip)
    proc = cli(cache_env, "cache", "import", str(bad), "--force")
    assert proc.returncode == 1
    assert "refusing a damaged bundle, nothing imported" in proc.stderr
    assert "file checksum mismatch" in proc.stderr
    assert ls(cache_env) == []
    junk = tmp_path / "junk.jkb"
    junk.write_bytes(b"not a tar file at all")
    proc = cli(cache_env, "cache", "import", str(junk))
    assert proc.returncode == 2 and "is not a jitkern bundle" in proc.stderr


def test_import_refuses_another_nvrtc_unless_forced(cache_env, tmp_path):
    bundle = _exported(cache_env, tmp_path)
    from jitkern.entry import CacheEntry

    def other_nvrtc(manifest, files):
        new_files = {}
        for e in manifest["entries"]:
            entry = CacheEntry.from_bytes(files[e["file"]])
            inputs = e["key_inputs"]
            inputs["nvrtc"] = entry.nvrtc_version = "99.0"
            blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
            entry.key = e["key"] = hashlib.sha256(blob).hexdigest()
            e["nvrtc_version"] = "99.0"
            e["file"] = f"entries/{entry.key}.jkc"
            data = entry.to_bytes()
            e["sha256"] = hashlib.sha256(data).hexdigest()
            new_files[e["file"]] = data
        manifest["nvrtc"] = ["99.0"]
        return manifest, new_files

    old = _rewrite(bundle, tmp_path / "old.jkb", other_nvrtc)
    proc = cli(cache_env, "cache", "import", str(old))
    assert proc.returncode == 1
    assert "built with NVRTC 99.0 but this machine has NVRTC" in proc.stderr
    assert "Pass --force" in proc.stderr and ls(cache_env) == []
    im = cli_json(cache_env, "cache", "import", str(old), "--force", "--json")
    assert im["imported"] == 4 and im["forced"] is True and im["unusable_here"] == 4


def test_import_refuses_a_bundle_for_another_gpu_unless_forced(cache_env, tmp_path):
    bundle = _exported(cache_env, tmp_path)  # sm_90 entries
    proc = cli(cache_env, "cache", "import", str(bundle), "--arch", "sm_100a")
    assert proc.returncode == 1
    assert "its targets (sm_90) do not match sm_100a (--arch)" in proc.stderr
    assert ls(cache_env) == []
    im = cli_json(cache_env, "cache", "import", str(bundle), "--arch", "sm_100a", "--force", "--json")
    assert im["imported"] == 4


@pytest.mark.skipif(HAS_GPU, reason="checks the output without a GPU")
def test_info_reports_versions_headers_cache_and_remote(cache_env, tmp_path):
    warm(cache_env, tmp_path, unrolls=(1,))
    info = cli_json(cache_env, "info", "--json")
    assert info["jitkern"] and info["nvrtc"].count(".") == 1 and "sm_90" in info["nvrtc_targets"]
    assert Path(info["cuda_include"], "cuda_fp16.h").is_file()
    assert info["device"]["count"] == 0
    assert info["cache"]["cache_dir"] == cache_env["JITKERN_CACHE_DIR"]
    assert info["cache"]["entries"] == 2 and info["cache"]["bytes"] > 0
    assert info["remote"] == {"configured": False}
    assert "selftest" in [f["name"] for f in info["families"]]
    assert info["packages"]["diskcache"]
    text = cli(cache_env, "info").stdout
    assert "NVRTC" in text and "GPU: none" in text and "CUDA headers:" in text and "remote:" in text


def test_info_and_stats_show_a_live_remote_tier_without_its_password(cache_env, tmp_path):
    try:
        from redis_server import RedisServer, have_redis_server
    except ImportError:
        pytest.skip("the Redis test server helper is not here")
    if not have_redis_server():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis", password="s3cret-pw")
    server.start()
    try:
        env = dict(cache_env, JITKERN_REMOTE_CACHE=server.url, JITKERN_REMOTE_CACHE_KEY="k" * 32)
        info = cli_json(env, "info", "--json")
        remote = info["remote"]
        assert remote["configured"] is True and remote["state"] == "ok"
        assert remote["url"].startswith("redis://") and "***" in remote["url"]
        stats = cli_json(env, "cache", "stats", "--json")
        assert stats["remote"]["configured"] is True
        for text in (json.dumps(info), json.dumps(stats), cli(env, "info").stdout,
                     cli(env, "cache", "stats").stdout):
            assert "s3cret-pw" not in text
        assert "remote:" in cli(env, "info").stdout
    finally:
        server.stop()


def test_a_read_only_cache_can_be_listed_verified_and_exported(cache_env, tmp_path):
    from test_cache import run_with_read_only

    warm(cache_env, tmp_path, unrolls=(1, 2))
    d = cache_env["JITKERN_CACHE_DIR"]
    bundle = tmp_path / "out" / "b.jkb"
    bundle.parent.mkdir()
    code = ("import sys, json, io, contextlib\nfrom jitkern.cli import main\n"
            "def run(*a):\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        code = main(list(a))\n"
            "    return code, json.loads(buf.getvalue().strip().splitlines()[-1])\n"
            "out = {}\n"
            "out['ls'] = run('cache', 'ls', '--json')\n"
            "out['stats'] = run('cache', 'stats', '--json')\n"
            "out['verify'] = run('cache', 'verify', '--keep', '--json')\n"
            f"out['export'] = run('cache', 'export', {str(bundle)!r}, '--json')\n"
            "print(json.dumps(out))\n")
    out, proc = run_with_read_only(code, cache_env, d)
    assert out["ls"][0] == 0 and len(out["ls"][1]) == 4
    assert out["stats"][1]["entries"] == 4 and out["stats"][1]["writable"] is False
    assert out["verify"][0] == 0 and out["verify"][1]["checked"] == 4
    assert out["export"][1]["entries"] == 4 and bundle.is_file()
    # dropping needs a writable cache: a clear error, not a traceback
    code = "import sys\nfrom jitkern.cli import main\nsys.exit(main(['cache', 'clear', '--yes']))\n"
    with pytest.raises(AssertionError, match="cannot open the cache at .* for writing"):
        run_with_read_only(code, cache_env, d)


@pytest.mark.gpu
def test_verify_load_tests_entries_on_the_gpu_and_drops_one_that_does_not_load(cache_env):
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    arch = f"sm_{major}{minor}"
    cli_json(cache_env, "warmup", "--arch", arch, "--family", "selftest", "--json")
    # an entry whose checksum holds but whose cubin is not a cubin: only loading finds it
    code = f"""
from jitkern.entry import CacheEntry
from jitkern.service import SERVICE
e = CacheEntry(key="e" * 64, family="selftest", name="selftest/garbage", config={{}},
               arch="{arch}", nvrtc_version="0", options=[], lowered_names={{"axpy": "x"}},
               compile_seconds=0.0, cubin=b"definitely not a cubin")
SERVICE.disk.put(e.key, e.to_bytes())
"""
    subprocess.run([sys.executable, "-c", code], env=cache_env, cwd=ROOT, check=True)
    v = cli_json(cache_env, "cache", "verify", "--json", expect=1)
    assert v["checked"] == 3 and v["load_tested"] == 2 and v["bad"] == 1
    assert v["bad_entries"][0]["key"] == "e" * 64
    assert "does not load on this GPU" in v["bad_entries"][0]["problem"]
    again = cli_json(cache_env, "cache", "verify", "--json")
    assert again["checked"] == 2 and again["bad"] == 0 and again["load_tested"] == 2
