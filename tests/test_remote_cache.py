"""The Redis tier against a real redis-server (started per test on 127.0.0.1, free port): fleet
reuse, fail-open under a killed, silent or full server, HMAC authentication, TTL, namespaces,
TLS, and the configuration errors. "Nodes" are separate processes with their own disk caches."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import run_py
from jitkern.cache import remote, signing
from redis_server import RedisServer, SilentServer, SlowServer, have_redis_server, make_tls_files

redis = pytest.importorskip("redis")
needs_server = pytest.mark.skipif(not have_redis_server(),
                                  reason="needs redis-server (apt install redis-server)")

KEY = "k3y-0f-the-fleet-0123456789abcdef"
OTHER_KEY = "an0ther-fleet-key-0123456789abcdef"

# A node: compiles the selftest configurations it reads on stdin (one JSON object a line) and
# answers each with a JSON line: the key, the time spent in the remote tier's get and put, the
# process counters and the tier's description.
NODE = r"""
import json, sys, time
import jitkern
from jitkern.families.selftest import SELFTEST
from jitkern.service import SERVICE

tier = SERVICE.remote_tier()
timing = {}
if tier is not None:
    for name in ("get", "put"):
        def timed(*args, _orig=getattr(tier, name), _name=name):
            t0 = time.perf_counter()
            try:
                return _orig(*args)
            finally:
                timing[_name] = time.perf_counter() - t0
        setattr(tier, name, timed)
for line in sys.stdin:
    cfg = json.loads(line)
    timing.clear()
    t0 = time.perf_counter()
    e = jitkern.compile(SELFTEST, cfg, arch="sm_90")
    print(json.dumps({"key": e.key, "seconds": time.perf_counter() - t0, "timing": dict(timing),
                      "stats": jitkern.stats(),
                      "remote": tier.describe() if tier is not None else None}), flush=True)
"""

CFGS = [{"dtype": d, "unroll": u} for d in ("fp32", "fp16", "bf16") for u in range(1, 9)]


@pytest.fixture
def server(tmp_path):
    if not have_redis_server():
        pytest.skip("needs redis-server (apt install redis-server)")
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


def node_env(cache_env, tmp_path, name, url, key=KEY, **extra):
    """The environment of node ``name``: its own (empty) disk cache, the remote tier at ``url``."""
    env = dict(cache_env, JITKERN_CACHE_DIR=str(tmp_path / f"node-{name}"), JITKERN_REMOTE_CACHE=url)
    if key is not None:
        env["JITKERN_REMOTE_CACHE_KEY"] = key
    env.update({f"JITKERN_REMOTE_CACHE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def run_node(env, cfgs, check=True):
    """Run a node over ``cfgs`` in one fresh process: (list of per-call answers, stderr)."""
    proc = subprocess.run([sys.executable, "-c", NODE], env=env, capture_output=True, text=True,
                          input="".join(json.dumps(c) + "\n" for c in cfgs), timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()], proc.stderr


class Node:
    """A long-lived node process, driven one configuration at a time."""

    def __init__(self, env, tmp_path):
        self.err_path = tmp_path / f"stderr-{time.monotonic_ns()}"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", NODE], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True)

    def compile(self, cfg, timeout=60.0) -> dict:
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"node did not answer within {timeout} s:\n{self.stderr()}"
        line = self.proc.stdout.readline()
        assert line, f"node died:\n{self.stderr()}"
        return json.loads(line)

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()

    def close(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._err.close()
        return self.err_path.read_text()


def redis_keys(server) -> list:
    return sorted(k.decode() for k in server.client().keys("*"))


# --- fleet reuse --------------------------------------------------------------------------------

def test_a_second_node_gets_its_kernels_from_redis_with_zero_compiles(server, cache_env, tmp_path):
    cfgs = CFGS[:2]
    a, _ = run_node(node_env(cache_env, tmp_path, "a", server.url), cfgs)
    assert a[-1]["stats"]["compiles"] == 2 and a[-1]["stats"]["remote_writes"] == 2
    assert a[-1]["stats"]["remote_misses"] == 2
    keys = [r["key"] for r in a]
    assert redis_keys(server) == sorted(f"jitkern:v1:{k}" for k in keys)
    assert all(server.client().get(f"jitkern:v1:{k}")[:5] == b"JKR1H" for k in keys)  # signed

    env_b = node_env(cache_env, tmp_path, "b", server.url)
    b, _ = run_node(env_b, cfgs)
    s = b[-1]["stats"]
    assert s["compiles"] == 0 and s["remote_hits"] == 2 and s["disk_writes"] == 2
    assert [r["key"] for r in b] == keys
    assert b[-1]["remote"]["bytes_read"] > 0

    # the hit went to node b's disk: its next process does not ask Redis at all
    b2, _ = run_node(env_b, cfgs)
    s = b2[-1]["stats"]
    assert s["disk_hits"] == 2 and s["compiles"] == 0
    assert s["remote_hits"] == s["remote_misses"] == s["remote_skipped"] == s["remote_errors"] == 0


def test_describe_probes_the_server_on_request(server, cache_env, tmp_path):
    run_node(node_env(cache_env, tmp_path, "a", server.url), CFGS[:2])
    code = ("import json\nfrom jitkern.cache import remote\n"
            "tier = remote.from_env()\n"
            "print(json.dumps([tier.describe(), tier.describe(probe=True)]))\n")
    (plain, probed), _ = run_py(code, node_env(cache_env, tmp_path, "b", server.url))
    assert "server" not in plain and plain["state"] == "ok"
    srv = probed["server"]
    assert srv["keys"] == 2 and srv["redis_version"].split(".")[0].isdigit()
    assert srv["ping_ms"] < 1000 and srv["used_memory"] > 0 and srv["maxmemory_policy"]
    server.kill()  # a probe of a dead server reports it, within the timeout, like a lookup
    (_, dead), _ = run_py(code, node_env(cache_env, tmp_path, "b", server.url))
    assert "server" not in dead and dead["state"] == "backing-off" and "probe" in dead["last_error"]


def test_namespaces_keep_fleets_apart_in_one_redis(server, cache_env, tmp_path):
    run_node(node_env(cache_env, tmp_path, "a", server.url), CFGS[:1])
    b, _ = run_node(node_env(cache_env, tmp_path, "b", server.url, namespace="staging"), CFGS[:1])
    assert b[0]["stats"]["compiles"] == 1 and b[0]["stats"]["remote_misses"] == 1
    assert b[0]["remote"]["namespace"] == "staging:v1:"
    key = b[0]["key"]
    assert redis_keys(server) == [f"jitkern:v1:{key}", f"staging:v1:{key}"]


def test_redis_is_imported_only_when_the_tier_is_configured(cache_env):
    code = ("import json, sys, jitkern\nfrom jitkern.families.selftest import SELFTEST\n"
            "jitkern.compile(SELFTEST, {'dtype': 'fp32'}, arch='sm_90')\n"
            "print(json.dumps({'redis': 'redis' in sys.modules,"
            " 'tier': jitkern.service.SERVICE.remote_tier() is None}))\n")
    out, _ = run_py(code, cache_env)
    assert out == {"redis": False, "tier": True}


def test_without_redis_py_the_tier_says_what_to_install_and_the_job_goes_on(cache_env, tmp_path):
    env = node_env(cache_env, tmp_path, "a", "redis://127.0.0.1:1/0")
    code = "import sys\nsys.modules['redis'] = None  # as if not installed\n" + NODE
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          input=json.dumps(CFGS[0]) + "\n", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stats"]["compiles"] == 1 and out["stats"]["remote_skipped"] == 2
    assert out["remote"]["state"] == "disabled"
    assert "pip install 'jitkern[redis]'" in out["remote"]["reason"]
    assert proc.stderr.count("pip install 'jitkern[redis]'") == 1


# --- fail open ----------------------------------------------------------------------------------

def test_redis_killed_mid_run_and_restarted(server, cache_env, tmp_path):
    timeout, backoff = 0.5, 2.0
    node = Node(node_env(cache_env, tmp_path, "a", server.url, timeout=timeout, backoff=backoff), tmp_path)
    try:
        r = node.compile(CFGS[0])
        assert r["stats"]["remote_writes"] == 1 and r["remote"]["state"] == "ok"

        server.kill()
        r = node.compile(CFGS[1])  # lookup fails (connection refused), compiled locally
        s = r["stats"]
        assert s["compiles"] == 2 and s["remote_errors"] == 1 and s["remote_skipped"] == 1  # the put
        assert r["timing"]["get"] < timeout + 0.25 and r["timing"]["put"] < 0.05
        assert r["remote"]["state"] == "backing-off" and "lookup" in r["remote"]["last_error"]

        r = node.compile(CFGS[2])  # inside the back-off: Redis is not even tried
        assert r["stats"]["remote_errors"] == 1 and r["stats"]["remote_skipped"] == 3
        assert r["timing"]["get"] < 0.05 and r["stats"]["compiles"] == 3

        server.start()  # same port, empty
        time.sleep(backoff + 0.3)
        r = node.compile(CFGS[3])  # recovered: a real miss, then the write lands
        s = r["stats"]
        assert s["remote_misses"] == 2 and s["remote_writes"] == 2 and s["remote_errors"] == 1
        assert r["remote"]["state"] == "ok"
        assert redis_keys(server) == [f"jitkern:v1:{r['key']}"]

        server.kill()  # a second outage: counted and logged at INFO, not warned again
        r = node.compile(CFGS[4])
        assert r["stats"]["remote_errors"] == 2 and r["stats"]["compiles"] == 5
        assert r["timing"]["get"] < timeout + 0.25
    finally:
        err = node.close()
    assert node.proc.returncode == 0, err
    assert err.count("unavailable") == 1, err


@pytest.mark.parametrize("path", ["/0", "/3"], ids=["plain", "password-and-db"])
def test_a_server_that_never_answers_costs_at_most_the_timeout(cache_env, tmp_path, path):
    silent = SilentServer()
    # with a password and a db, redis-py sends AUTH and SELECT before GET: three socket waits,
    # which the tier's deadline still caps at one timeout
    auth = ":s3cret@" if path == "/3" else ""
    url = f"redis://{auth}127.0.0.1:{silent.port}{path}"
    timeout = 0.3
    node = Node(node_env(cache_env, tmp_path, "a", url, timeout=timeout, backoff=60), tmp_path)
    try:
        r = node.compile(CFGS[0], timeout=30)
        assert r["timing"]["get"] < timeout + 0.25, r["timing"]
        assert r["timing"]["put"] < 0.05  # backing off: not tried
        s = r["stats"]
        assert s["compiles"] == 1 and s["remote_errors"] == 1 and s["remote_skipped"] == 1
        assert r["remote"]["state"] == "backing-off"
        assert f"no answer within {timeout:g} s" in r["remote"]["last_error"]
        r = node.compile(CFGS[1], timeout=30)
        assert r["timing"]["get"] < 0.05 and r["stats"]["remote_skipped"] == 3
    finally:
        err = node.close()
        silent.close()
    assert err.count("unavailable") == 1 and "s3cret" not in err


def test_a_slow_server_costs_at_most_the_timeout_per_lookup(cache_env, tmp_path):
    timeout = 0.4
    slow = SlowServer(delay=0.3)  # AUTH, SELECT, GET each answered just inside the socket timeout
    node = Node(node_env(cache_env, tmp_path, "a", slow.url, timeout=timeout, backoff=60), tmp_path)
    try:
        r = node.compile(CFGS[0], timeout=30)
        assert r["timing"]["get"] < timeout + 0.25, r["timing"]
        assert r["stats"]["remote_errors"] == 1 and r["stats"]["compiles"] == 1
        assert f"no answer within {timeout:g} s" in r["remote"]["last_error"]
    finally:
        node.close()
        slow.close()
    assert slow.commands[:2] == ["AUTH", "SELECT"]  # it really was talking Redis


def test_concurrent_lookups_on_a_silent_server_are_each_bounded(caplog):
    silent = SilentServer()
    timeout = 0.3
    tier = remote.RedisTier(remote.RemoteConfig(url=silent.url, timeout=timeout, backoff=60,
                                                secret=KEY.encode()),
                            remote.make_client(remote.RemoteConfig(url=silent.url, timeout=timeout)))
    durations = []

    def lookup():
        t0 = time.perf_counter()
        assert tier.get("ab" * 32) is None
        durations.append(time.perf_counter() - t0)

    try:
        with caplog.at_level("INFO", logger="jitkern"):
            threads = [threading.Thread(target=lookup) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=10)
            assert len(durations) == 8 and max(durations) < timeout + 0.25, durations
            t0 = time.perf_counter()
            assert tier.get("cd" * 32) is None and tier.put(_fake_entry()) is False  # backing off
            assert time.perf_counter() - t0 < 0.05
    finally:
        silent.close()
    warnings_ = [r for r in caplog.records if r.levelname == "WARNING" and "unavailable" in r.message]
    assert len(warnings_) == 1 and tier.state() == "backing-off"


def _fake_entry():
    from jitkern.entry import CacheEntry

    return CacheEntry(key="ef" * 32, family="f", name="f/x", config={}, arch="sm_90",
                      nvrtc_version="13.0", options=[], lowered_names={}, compile_seconds=0.1,
                      cubin=os.urandom(1024))


def test_a_full_redis_pauses_writes_but_keeps_serving_reads(server, cache_env, tmp_path):
    run_node(node_env(cache_env, tmp_path, "a", server.url), CFGS[:1])
    c = server.client()
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", "1")  # every write is now refused with OOM
    b, err = run_node(node_env(cache_env, tmp_path, "b", server.url), CFGS[:3])
    hit, refused, paused = (r["stats"] for r in b)
    assert hit["remote_hits"] == 1 and hit["compiles"] == 0
    assert refused["compiles"] == 1 and refused["remote_errors"] == 1 and refused["remote_writes"] == 0
    assert b[1]["remote"]["writes"] == "paused" and b[1]["remote"]["state"] == "ok"
    assert "OutOfMemoryError" in b[1]["remote"]["last_error"]
    # lookups go on while writes are paused
    assert paused["remote_misses"] == 2 and paused["remote_skipped"] == 1 and paused["remote_errors"] == 1
    assert err.count("refused a write") == 1


@needs_server
def test_a_wrong_redis_password_fails_open_without_leaking_it(tmp_path, cache_env):
    server = RedisServer(tmp_path / "redis", password="right-pass").start()
    try:
        wrong = server.url.replace("right-pass", "wrong-pass")
        a, err = run_node(node_env(cache_env, tmp_path, "a", wrong), CFGS[:1])
        assert a[0]["stats"]["compiles"] == 1 and a[0]["stats"]["remote_errors"] == 1
        assert a[0]["remote"]["url"] == f"redis://:***@127.0.0.1:{server.port}/0"
        assert "unavailable" in err and "wrong-pass" not in err + json.dumps(a)
        b, _ = run_node(node_env(cache_env, tmp_path, "b", server.url), CFGS[:1])
        assert b[0]["stats"]["remote_writes"] == 1 and b[0]["stats"]["remote_errors"] == 0
    finally:
        server.stop()


@needs_server
def test_tls_with_a_private_ca(tmp_path, cache_env):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line to make a certificate")
    tls = make_tls_files(tmp_path / "tls")
    try:
        server = RedisServer(tmp_path / "redis", tls=tls).start()
    except RuntimeError as e:
        if "tls" in str(e).lower():
            pytest.skip(f"redis-server without TLS support: {e}")
        raise
    try:
        assert server.url.startswith("rediss://")
        run_node(node_env(cache_env, tmp_path, "a", server.url), CFGS[:1])
        b, _ = run_node(node_env(cache_env, tmp_path, "b", server.url), CFGS[:1])
        assert b[0]["stats"]["remote_hits"] == 1 and b[0]["stats"]["compiles"] == 0
        # without the CA the certificate is not trusted: fail open, compile locally
        plain = server.url.split("?")[0]
        c, err = run_node(node_env(cache_env, tmp_path, "c", plain), CFGS[:1])
        assert c[0]["stats"]["compiles"] == 1 and c[0]["stats"]["remote_errors"] == 1
        assert "unavailable" in err
    finally:
        server.stop()


@needs_server
def test_a_unix_socket_url(tmp_path, cache_env):
    sock = tmp_path / "r.sock"
    server = RedisServer(tmp_path / "redis", extra_args=("--unixsocket", str(sock))).start()
    try:
        url = f"unix://{sock}?db=2"
        run_node(node_env(cache_env, tmp_path, "a", url), CFGS[:1])
        b, _ = run_node(node_env(cache_env, tmp_path, "b", url), CFGS[:1])
        assert b[0]["stats"]["remote_hits"] == 1 and b[0]["stats"]["compiles"] == 0
        assert server.client().dbsize() == 0  # db 0 (TCP) is empty: the entry is in db 2
        assert len(redis.Redis(unix_socket_path=str(sock), db=2).keys("jitkern:v1:*")) == 1
    finally:
        server.stop()


# --- authentication -----------------------------------------------------------------------------

def _flip(value: bytes, index: int) -> bytes:
    b = bytearray(value)
    b[index] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("attack", ["cubin-byte", "tag-byte", "truncated", "other-key",
                                    "unsigned", "replayed-under-another-key", "garbage",
                                    "signed-malformed"])
def test_a_tampered_or_foreign_value_is_refused_and_recompiled(server, cache_env, tmp_path, attack):
    cfg, other_cfg = CFGS[5], CFGS[6]
    writer_key = {"other-key": OTHER_KEY, "unsigned": None}.get(attack, KEY)
    a, _ = run_node(node_env(cache_env, tmp_path, "a", server.url, key=writer_key), [cfg, other_cfg])
    rkey, other_rkey = (f"jitkern:v1:{r['key']}" for r in a)
    c = server.client()
    value = c.get(rkey)
    if attack == "cubin-byte":
        c.set(rkey, _flip(value, len(value) - 100))
    elif attack == "tag-byte":
        c.set(rkey, _flip(value, 10))
    elif attack == "truncated":
        c.set(rkey, value[: len(value) // 2])
    elif attack == "replayed-under-another-key":
        c.set(rkey, c.get(other_rkey))  # validly signed, for another kernel
    elif attack == "garbage":
        c.set(rkey, b"not a jitkern entry")
    elif attack == "signed-malformed":  # a fleet member's bug, not an attack: still never loaded
        meta = b"[1, 2]"
        c.set(rkey, signing.seal(rkey, b"JKC1" + len(meta).to_bytes(4, "little") + meta, KEY.encode()))

    b, err = run_node(node_env(cache_env, tmp_path, "b", server.url), [cfg])
    s = b[0]["stats"]
    assert s["remote_rejected"] == 1 and s["remote_hits"] == 0 and s["compiles"] == 1
    assert err.count("refused") == 1 and "compiling it here" in err
    # the fresh compile replaced the bad value: the next node takes it
    assert s["remote_writes"] == 1 and c.get(rkey)[:5] == b"JKR1H" and c.ttl(rkey) > 0
    c3, _ = run_node(node_env(cache_env, tmp_path, "c", server.url), [cfg])
    assert c3[0]["stats"]["remote_hits"] == 1 and c3[0]["stats"]["compiles"] == 0


def test_without_a_key_entries_are_unauthenticated_and_it_says_so_once(server, cache_env, tmp_path):
    a, err = run_node(node_env(cache_env, tmp_path, "a", server.url, key=None), CFGS[:2])
    assert err.count("unauthenticated") == 1
    assert a[-1]["remote"]["authenticated"] is False and a[-1]["stats"]["remote_writes"] == 2
    assert server.client().get(f"jitkern:v1:{a[0]['key']}")[:5] == b"JKR1U"
    b, err = run_node(node_env(cache_env, tmp_path, "b", server.url, key=None), CFGS[:2])
    assert b[-1]["stats"]["remote_hits"] == 2 and b[-1]["stats"]["compiles"] == 0
    # a node with the fleet's key does not take them
    c, _ = run_node(node_env(cache_env, tmp_path, "c", server.url), CFGS[:1])
    assert c[0]["stats"]["remote_rejected"] == 1 and c[0]["stats"]["compiles"] == 1


def test_the_key_can_come_from_a_file(server, cache_env, tmp_path):
    key_file = tmp_path / "secret"
    key_file.write_text(KEY + "\n")
    env = node_env(cache_env, tmp_path, "a", server.url, key=None, key_file=key_file)
    run_node(env, CFGS[:1])
    b, err = run_node(node_env(cache_env, tmp_path, "b", server.url), CFGS[:1])  # same key, inline
    assert b[0]["stats"]["remote_hits"] == 1 and "unauthenticated" not in err


# --- expiry -------------------------------------------------------------------------------------

def test_entries_expire_after_the_ttl_and_a_hit_refreshes_it(server, cache_env, tmp_path):
    a, _ = run_node(node_env(cache_env, tmp_path, "a", server.url, ttl=3), CFGS[:1])
    rkey = f"jitkern:v1:{a[0]['key']}"
    c = server.client()
    assert 0 < c.pttl(rkey) <= 3000
    time.sleep(1.5)
    left = c.pttl(rkey)
    b, _ = run_node(node_env(cache_env, tmp_path, "b", server.url, ttl=3), CFGS[:1])
    assert b[0]["stats"]["remote_hits"] == 1
    assert c.pttl(rkey) > left + 500  # the fetch gave it another full TTL
    deadline = time.monotonic() + 10
    while c.exists(rkey) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not c.exists(rkey)  # expired
    d, _ = run_node(node_env(cache_env, tmp_path, "d", server.url, ttl=3), CFGS[:1])
    assert d[0]["stats"]["remote_misses"] == 1 and d[0]["stats"]["compiles"] == 1


def test_ttl_zero_keeps_entries(server, cache_env, tmp_path):
    a, _ = run_node(node_env(cache_env, tmp_path, "a", server.url, ttl=0), CFGS[:1])
    assert a[0]["remote"]["ttl_s"] == 0
    assert server.client().ttl(f"jitkern:v1:{a[0]['key']}") == -1  # no expiry


def test_the_default_ttl_is_set(server, cache_env, tmp_path):
    a, _ = run_node(node_env(cache_env, tmp_path, "a", server.url), CFGS[:1])
    ttl = server.client().ttl(f"jitkern:v1:{a[0]['key']}")
    assert 7 * 86400 - 60 < ttl <= 7 * 86400 and a[0]["remote"]["ttl_s"] == 7 * 86400


# --- configuration, signing, URL masking (in process) -------------------------------------------



def test_unset_url_means_no_tier():
    assert remote.config_from_env({}) is None and remote.from_env({}) is None


def test_settings_are_read_with_units():
    cfg = remote.config_from_env({"JITKERN_REMOTE_CACHE": "rediss://:pw@cache.internal:6380/2",
                                  "JITKERN_REMOTE_CACHE_TIMEOUT": "150ms",
                                  "JITKERN_REMOTE_CACHE_BACKOFF": "2m",
                                  "JITKERN_REMOTE_CACHE_TTL": "1d",
                                  "JITKERN_REMOTE_CACHE_NAMESPACE": "prod-a",
                                  "JITKERN_REMOTE_CACHE_KEY": KEY})
    assert (cfg.timeout, cfg.backoff, cfg.ttl) == (0.15, 120.0, 86400)
    assert cfg.prefix == "prod-a:v1:" and cfg.secret == KEY.encode()
    assert KEY not in repr(cfg)
    default = remote.config_from_env({"JITKERN_REMOTE_CACHE": "redis://h:6379/0"})
    assert (default.timeout, default.backoff, default.ttl, default.secret) == (0.25, 30.0, 604800, None)


@pytest.mark.parametrize("env, message", [
    ({"JITKERN_REMOTE_CACHE": "http://h:6379"}, "JITKERN_REMOTE_CACHE='http://h:6379': expected a redis://"),
    ({"JITKERN_REMOTE_CACHE": "redis://:pw@h:port/0"}, "JITKERN_REMOTE_CACHE='redis://:***@h:port/0': the port"),
    ({"JITKERN_REMOTE_CACHE": "redis://:6379/0"}, "expected a host"),
    ({"JITKERN_REMOTE_CACHE_TIMEOUT": "fast"}, "JITKERN_REMOTE_CACHE_TIMEOUT='fast': expected a duration"),
    ({"JITKERN_REMOTE_CACHE_TIMEOUT": "0"}, "JITKERN_REMOTE_CACHE_TIMEOUT='0': must be greater than zero"),
    ({"JITKERN_REMOTE_CACHE_BACKOFF": "-1"}, "JITKERN_REMOTE_CACHE_BACKOFF='-1': expected a duration"),
    ({"JITKERN_REMOTE_CACHE_TTL": "500ms"}, "JITKERN_REMOTE_CACHE_TTL='500ms': expected 0 (never expire) or at least 1 s"),
    ({"JITKERN_REMOTE_CACHE_TTL": "7 weeks"}, "JITKERN_REMOTE_CACHE_TTL='7 weeks': expected a duration"),
    ({"JITKERN_REMOTE_CACHE_NAMESPACE": "a b"}, "JITKERN_REMOTE_CACHE_NAMESPACE='a b': expected letters"),
    ({"JITKERN_REMOTE_CACHE_KEY_FILE": "/nonexistent/secret"}, "JITKERN_REMOTE_CACHE_KEY_FILE='/nonexistent/secret': cannot read"),
])
def test_malformed_settings_are_named(env, message):
    full = {"JITKERN_REMOTE_CACHE": "redis://127.0.0.1:6379/0", **env}
    with pytest.raises(ValueError) as err:
        remote.config_from_env(full)
    assert message in str(err.value)
    assert "pw" not in str(err.value).replace("port", "")


def test_an_empty_key_file_is_an_error(tmp_path):
    (tmp_path / "k").write_text("\n")
    with pytest.raises(ValueError, match="JITKERN_REMOTE_CACHE_KEY_FILE=.*: the key file is empty"):
        remote.config_from_env({"JITKERN_REMOTE_CACHE": "redis://h:1/0",
                                "JITKERN_REMOTE_CACHE_KEY_FILE": str(tmp_path / "k")})


def test_a_database_that_is_not_a_number_is_an_error():
    with pytest.raises(ValueError, match="JITKERN_REMOTE_CACHE='redis://h:1/x': the database 'x' is not a number"):
        remote.from_env({"JITKERN_REMOTE_CACHE": "redis://h:1/x", "JITKERN_REMOTE_CACHE_KEY": KEY})


def test_redis_py_url_errors_are_named():
    with pytest.raises(ValueError, match=r"JITKERN_REMOTE_CACHE='redis://h:1/0\?socket_timeout=soon': "
                                         "Invalid value for 'socket_timeout'"):
        remote.from_env({"JITKERN_REMOTE_CACHE": "redis://h:1/0?socket_timeout=soon",
                         "JITKERN_REMOTE_CACHE_KEY": KEY})


def test_start_up_warnings():
    with pytest.warns(RuntimeWarning, match="entries are unauthenticated"):
        tier = remote.from_env({"JITKERN_REMOTE_CACHE": "redis://127.0.0.1:1/0"})
    assert tier.describe()["authenticated"] is False
    with pytest.warns(RuntimeWarning, match="JITKERN_REMOTE_CACHE_KEY is 5 bytes; use at least 16"):
        remote.from_env({"JITKERN_REMOTE_CACHE": "redis://127.0.0.1:1/0", "JITKERN_REMOTE_CACHE_KEY": "short"})


@pytest.mark.parametrize("url, shown", [
    ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://alice:hunter2@h:6379/0", "redis://alice:***@h:6379/0"),
    ("rediss://h:6380/1?password=hunter2&ssl_ca_certs=/ca.pem", "rediss://h:6380/1?password=***&ssl_ca_certs=/ca.pem"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
])
def test_urls_are_shown_without_their_password(url, shown):
    assert remote.mask_url(url) == shown


def test_a_seal_binds_the_secret_the_redis_key_and_the_bytes():
    blob = os.urandom(4096)
    sealed = signing.seal("ns:v1:abc", blob, b"s" * 32)
    assert signing.open_sealed("ns:v1:abc", sealed, b"s" * 32) == blob
    refusals = [("ns:v1:abd", sealed, b"s" * 32),                       # other Redis key
                ("ns:v1:abc", sealed, b"t" * 32),                       # other secret
                ("ns:v1:abc", sealed[:-1] + bytes([sealed[-1] ^ 1]), b"s" * 32),  # other bytes
                ("ns:v1:abc", sealed[:20], b"s" * 32),                  # truncated tag
                ("ns:v1:abc", signing.seal("ns:v1:abc", blob, None), b"s" * 32)]  # unsigned
    for rkey, value, secret in refusals:
        with pytest.raises(signing.Rejected):
            signing.open_sealed(rkey, value, secret)
    # without a secret nothing can be verified; both forms are read
    assert signing.open_sealed("ns:v1:abc", sealed, None) == blob
    assert signing.open_sealed("ns:v1:abc", signing.seal("ns:v1:abc", blob, None), None) == blob
