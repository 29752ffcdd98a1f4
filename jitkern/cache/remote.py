"""The remote tier: a Redis shared by a fleet, so a kernel compiled once is fetched everywhere.

The service asks this tier after memory, the read-only directories and the disk cache missed
(``get``), writes a hit to its disk cache, and hands every fresh compile to ``put``.

Policies (docs/remote_cache.md explains them for users):

- Fail open, with a hard deadline. Every Redis operation runs on a short-lived helper thread and
  the caller waits at most ``timeout`` seconds for it, whatever the socket is doing (connect,
  AUTH, SELECT, the command itself, even a name lookup that hangs). On a failure or an expired
  deadline the tier backs off for ``backoff`` seconds: lookups and writes are skipped at no cost
  (counted in ``remote_skipped``) and the kernel is compiled locally. One warning per process;
  later outages and the recovery are logged at INFO. Nothing here raises into the job.
- A server that answers but refuses a write (``maxmemory`` reached with ``noeviction``, a
  read-only replica) pauses writes only; reads go on.
- ``put`` is a bounded wait, not a background queue: when it returns without an error the entry
  is in Redis, so a short-lived warm-up job leaves the fleet a complete cache. It costs one round
  trip (about a millisecond) after a compile that took hundreds, at most ``timeout``.
- Values are sealed by jitkern.cache.signing (HMAC-SHA256 over Redis key and entry) under the
  fleet's secret; anything that does not verify is refused, counted (``remote_rejected``) and
  recompiled, and the fresh compile overwrites it.
- Keys are ``<namespace>:v<cache format>:<cache key>``: several jitkern versions (and, with
  their own namespaces, several fleets) share one Redis. Entries expire ``ttl`` seconds after
  they were last written or fetched (a hit refreshes the TTL in the same round trip).

redis-py is imported only when ``JITKERN_REMOTE_CACHE`` is set.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..entry import CacheEntry
from ..errors import CorruptEntry
from ..key import CACHE_FORMAT
from ..stats import COUNTERS
from .signing import Rejected, open_sealed, seal

log = logging.getLogger("jitkern")

ENV_URL = "JITKERN_REMOTE_CACHE"
ENV_TIMEOUT = "JITKERN_REMOTE_CACHE_TIMEOUT"
ENV_BACKOFF = "JITKERN_REMOTE_CACHE_BACKOFF"
ENV_TTL = "JITKERN_REMOTE_CACHE_TTL"
ENV_KEY = "JITKERN_REMOTE_CACHE_KEY"
ENV_KEY_FILE = "JITKERN_REMOTE_CACHE_KEY_FILE"
ENV_NAMESPACE = "JITKERN_REMOTE_CACHE_NAMESPACE"

DEFAULT_TIMEOUT = 0.25          # seconds, the most one lookup or write may cost
DEFAULT_BACKOFF = 30.0          # seconds without remote traffic after a failure
DEFAULT_TTL = 7 * 24 * 3600     # seconds since last write or fetch; 0 keeps entries forever
DEFAULT_NAMESPACE = "jitkern"
SCHEMES = ("redis", "rediss", "unix")
INSTALL_HINT = "pip install 'jitkern[redis]'"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {None: 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.\-]+$")


# --- settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteConfig:
    """The tier's settings, as read from the environment by ``config_from_env``."""

    url: str
    timeout: float = DEFAULT_TIMEOUT
    backoff: float = DEFAULT_BACKOFF
    ttl: int = DEFAULT_TTL
    namespace: str = DEFAULT_NAMESPACE
    secret: bytes | None = field(default=None, repr=False)

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:v{CACHE_FORMAT}:"


def parse_duration(name: str, text: str, allow_zero: bool) -> float:
    """'0.25', '250ms', '30s', '5m', '12h', '7d' -> seconds. Raises ValueError naming ``name``."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"{name}={text!r}: expected a duration in seconds with an optional unit "
                         "ms, s, m, h or d (e.g. 0.25, 250ms, 30s, 7d)")
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds == 0 and not allow_zero:
        raise ValueError(f"{name}={text!r}: must be greater than zero")
    return seconds


def mask_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` query item) as ``***``."""
    parts = urlsplit(url)
    secret_query = any(k.lower() == "password" for k, _ in parse_qsl(parts.query))
    if parts.password is None and not secret_query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)],
                      safe="*/")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def _secret(env) -> bytes | None:
    path = env.get(ENV_KEY_FILE)
    if path:
        try:
            with open(path, "rb") as f:
                data = f.read().strip()
        except OSError as e:
            raise ValueError(f"{ENV_KEY_FILE}={path!r}: cannot read the key file ({e.strerror})") from None
        if not data:
            raise ValueError(f"{ENV_KEY_FILE}={path!r}: the key file is empty")
        return data
    key = env.get(ENV_KEY)
    return key.encode() if key else None


def config_from_env(env=None) -> RemoteConfig | None:
    """The remote tier's settings from ``env`` (default: the process environment), or None when
    ``JITKERN_REMOTE_CACHE`` is unset. Raises ValueError naming the variable for a malformed one."""
    env = os.environ if env is None else env
    url = env.get(ENV_URL, "").strip()
    if not url:
        return None
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"{ENV_URL}={mask_url(url)!r}: expected a redis://host:port/db, "
                         "rediss://host:port/db (TLS) or unix:///path/to/socket URL")
    if scheme != "unix":
        try:
            urlsplit(url).port  # noqa: B018 -- raises ValueError for a malformed port
        except ValueError:
            raise ValueError(f"{ENV_URL}={mask_url(url)!r}: the port is not a number in 0-65535") from None
        if not urlsplit(url).hostname:
            raise ValueError(f"{ENV_URL}={mask_url(url)!r}: expected a host, as in redis://host:6379/0")
        db = urlsplit(url).path.strip("/")
        if db and not db.isdigit():  # redis-py would silently use db 0
            raise ValueError(f"{ENV_URL}={mask_url(url)!r}: the database {db!r} is not a number, "
                             "as in redis://host:6379/0")
    namespace = env.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE
    if not _NAMESPACE.match(namespace):
        raise ValueError(f"{ENV_NAMESPACE}={namespace!r}: expected letters, digits, '_', '-' or '.'")

    def duration(name, default, allow_zero):
        text = env.get(name)
        return default if text is None or not text.strip() else parse_duration(name, text, allow_zero)

    ttl = duration(ENV_TTL, DEFAULT_TTL, allow_zero=True)
    if 0 < ttl < 1:
        raise ValueError(f"{ENV_TTL}={env.get(ENV_TTL)!r}: expected 0 (never expire) or at least 1 s")
    return RemoteConfig(url=url,
                        timeout=duration(ENV_TIMEOUT, DEFAULT_TIMEOUT, allow_zero=False),
                        backoff=duration(ENV_BACKOFF, DEFAULT_BACKOFF, allow_zero=True),
                        ttl=int(round(ttl)), namespace=namespace, secret=_secret(env))


# --- the tier -----------------------------------------------------------------------------------

_SKIPPED = object()   # the tier is backing off: nothing was sent
_FAILED = object()    # the operation failed or missed its deadline (already counted and logged)


class RedisTier:
    """The Redis tier: ``get(key) -> CacheEntry | None``, ``put(entry) -> bool``, ``describe()``.

    Thread-safe; never raises from get/put. ``client`` is a redis.Redis, or None for a tier that
    is configured but cannot run (``reason`` says why: redis-py is not installed)."""

    def __init__(self, config: RemoteConfig, client=None, reason: str = ""):
        self.config = config
        self.client = client
        self.reason = reason
        self._lock = threading.Lock()
        self._retry_at = 0.0          # monotonic time before which nothing is sent
        self._writes_retry_at = 0.0   # ... before which no write is sent
        self._failing = False
        self._warned = False
        self._warned_writes = False
        self._last_error: str | None = None
        self._bytes_read = 0
        self._bytes_written = 0

    # --- the operations the service calls
    def get(self, key: str) -> CacheEntry | None:
        """The verified entry stored for cache key ``key``, or None (miss, refused, unreachable)."""
        rkey = self.config.prefix + key
        ttl = self.config.ttl

        def fetch(client):
            if not ttl:
                return client.get(rkey)
            pipe = client.pipeline(transaction=False)
            pipe.get(rkey)
            pipe.expire(rkey, ttl)  # a fetched entry lives another TTL
            return pipe.execute()[0]

        value = self._run("lookup", fetch, write=False)
        if value is _SKIPPED or value is _FAILED:
            return None
        if value is None:
            COUNTERS.add("remote_misses")
            return None
        with self._lock:
            self._bytes_read += len(value)
        try:
            return CacheEntry.from_bytes(open_sealed(rkey, value, self.config.secret), expect_key=key)
        except Exception as err:  # noqa: BLE001 -- Rejected, CorruptEntry, or a malformed entry
            reason = str(err) if isinstance(err, (Rejected, CorruptEntry)) else f"malformed entry: {err!r}"
            COUNTERS.add("remote_rejected")
            log.warning("jitkern: remote cache entry %s refused (%s); compiling it here", key[:16], reason)
            return None

    def put(self, entry: CacheEntry) -> bool:
        """Store ``entry`` (sealed, with the TTL); waits at most the timeout. True if stored."""
        rkey = self.config.prefix + entry.key
        value = seal(rkey, entry.to_bytes(), self.config.secret)
        ttl = self.config.ttl or None
        done = self._run("write", lambda client: client.set(rkey, value, ex=ttl), write=True)
        if done is _SKIPPED or done is _FAILED:
            return False
        COUNTERS.add("remote_writes")
        with self._lock:
            self._bytes_written += len(value)
        return True

    # --- deadline and back-off
    def _run(self, what: str, fn, write: bool):
        """``fn(client)`` on a helper thread; its result, or _SKIPPED / _FAILED."""
        now = time.monotonic()
        if self.client is None or now < self._retry_at or (write and now < self._writes_retry_at):
            COUNTERS.add("remote_skipped")
            return _SKIPPED
        box = []
        done = threading.Event()

        def work():
            try:
                box.append((True, fn(self.client)))
            except BaseException as e:  # noqa: BLE001 -- reported to the waiting caller
                box.append((False, e))
            finally:
                done.set()

        try:
            threading.Thread(target=work, name="jitkern-remote", daemon=True).start()
        except RuntimeError as e:  # no thread to be had (process limits): treat as an outage
            self._failed(what, f"RuntimeError: {e}", writes_only=False)
            return _FAILED
        if not done.wait(self.config.timeout):
            self._failed(what, f"no answer within {self.config.timeout:g} s", writes_only=False)
            return _FAILED
        ok, value = box[0]
        if not ok:
            self._failed(what, f"{type(value).__name__}: {value}",
                         writes_only=write and _is_refusal(value))
            return _FAILED
        if self._failing:
            with self._lock:
                recovered, self._failing = self._failing, False
            if recovered:
                log.info("jitkern: remote cache %s is reachable again", mask_url(self.config.url))
        return value

    def _failed(self, what: str, error: str, writes_only: bool) -> None:
        COUNTERS.add("remote_errors")
        with self._lock:
            self._last_error = f"{what}: {error}"
            until = time.monotonic() + self.config.backoff
            if writes_only:
                self._writes_retry_at = until
                first, self._warned_writes = not self._warned_writes, True
            else:
                self._retry_at = until
                self._failing = True
                first, self._warned = not self._warned, True
        url = mask_url(self.config.url)
        if writes_only:
            level = logging.WARNING if first else logging.INFO
            log.log(level, "jitkern: remote cache %s refused a write (%s); writes paused for %g s, "
                    "lookups go on", url, error, self.config.backoff)
            return
        if self.client is not None:
            try:  # the next attempt opens fresh connections instead of reusing dead ones
                self.client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001
                pass
        level = logging.WARNING if first else logging.INFO
        log.log(level, "jitkern: remote cache %s unavailable (%s %s); continuing without it, "
                "retrying in %g s", url, what, error, self.config.backoff)

    # --- observability
    def state(self) -> str:
        """``ok``, ``backing-off`` (nothing sent until the back-off ends) or ``disabled``."""
        if self.client is None:
            return "disabled"
        return "backing-off" if time.monotonic() < self._retry_at else "ok"

    def describe(self, probe: bool = False) -> dict:
        """What ``jitkern info`` and ``jitkern cache stats`` show: the URL without its password,
        state, whether entries are authenticated, TTL, namespace, timeouts, this process's
        counters. ``probe=True`` first asks the server (within the timeout, like a lookup) for
        ``server``: its version, round-trip ms, memory use, cap and eviction policy, key count."""
        server = self._probe() if probe else None
        now = time.monotonic()
        stats = COUNTERS.snapshot()
        with self._lock:
            out = {
                "url": mask_url(self.config.url),
                "state": self.state(),
                "writes": "paused" if now < self._writes_retry_at else "ok",
                "retry_in_s": round(max(0.0, max(self._retry_at, self._writes_retry_at) - now), 3),
                "authenticated": self.config.secret is not None,
                "ttl_s": self.config.ttl,
                "namespace": self.config.prefix,
                "timeout_s": self.config.timeout,
                "backoff_s": self.config.backoff,
                "last_error": self._last_error,
                "bytes_read": self._bytes_read,
                "bytes_written": self._bytes_written,
                "counters": {k: v for k, v in stats.items() if k.startswith("remote_")},
            }
        if self.reason:
            out["reason"] = self.reason
        if server is not None:
            out["server"] = server
        return out

    def _probe(self) -> dict | None:
        def ask(client):
            t0 = time.perf_counter()
            client.ping()
            rtt = time.perf_counter() - t0
            info = client.info("server")
            mem = client.info("memory")
            return {"redis_version": info.get("redis_version"), "ping_ms": round(rtt * 1e3, 3),
                    "used_memory": mem.get("used_memory"), "maxmemory": mem.get("maxmemory"),
                    "maxmemory_policy": mem.get("maxmemory_policy"), "keys": client.dbsize()}

        got = self._run("probe", ask, write=False)
        return None if got is _SKIPPED or got is _FAILED else got

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001
                pass


def _is_refusal(err: BaseException) -> bool:
    """The server answered with an error (OOM, READONLY, NOPERM...): it is alive but will not
    take writes. Connection errors and timeouts are not refusals."""
    try:
        from redis.exceptions import ResponseError
    except ImportError:
        return False
    return isinstance(err, ResponseError)


def make_client(config: RemoteConfig):
    """A redis.Redis for ``config``: socket timeouts a little past the tier's deadline (so the
    deadline, not a socket, decides when a call gives up, and an abandoned helper thread ends
    soon after), no retries (the tier's back-off replaces them), RESP2 and no CLIENT SETINFO (the
    fewest round trips on connect, and any Redis server version)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    t = 2 * config.timeout
    kwargs = dict(socket_connect_timeout=t, socket_timeout=t, retry=Retry(NoBackoff(), 0),
                  health_check_interval=0)
    params = inspect.signature(redis.Redis.__init__).parameters
    if "driver_info" in params:      # redis-py 7+: None turns CLIENT SETINFO off
        kwargs["driver_info"] = None
    elif "lib_name" in params:       # redis-py 5 and 6
        kwargs.update(lib_name=None, lib_version=None)
    if "protocol" in params:
        kwargs["protocol"] = 2
    return redis.Redis.from_url(config.url, **kwargs)


def from_env(env=None) -> RedisTier | None:
    """The tier configured by ``JITKERN_REMOTE_CACHE`` (None when it is unset).

    Warns once when entries will be unauthenticated (no ``JITKERN_REMOTE_CACHE_KEY``) and when
    redis-py is missing (the tier is then ``disabled``, the job goes on without it)."""
    config = config_from_env(env)
    if config is None:
        return None
    try:
        import redis  # noqa: F401
    except ImportError:
        reason = f"the redis package is not installed ({INSTALL_HINT})"
        warnings.warn(f"jitkern: {ENV_URL} is set but {reason}; continuing without the remote cache",
                      RuntimeWarning, stacklevel=2)
        return RedisTier(config, None, reason)
    try:
        client = make_client(config)
    except ValueError as e:  # redis-py's own URL checks (db, query options)
        raise ValueError(f"{ENV_URL}={mask_url(config.url)!r}: {e}") from None
    if config.secret is None:
        warnings.warn(f"jitkern: remote cache {mask_url(config.url)}: {ENV_KEY} is not set, so "
                      "its entries are unauthenticated (anyone who can write to this Redis can "
                      "inject code); set the same secret on every node", RuntimeWarning, stacklevel=2)
    elif len(config.secret) < 16:
        warnings.warn(f"jitkern: {ENV_KEY} is {len(config.secret)} bytes; use at least 16 random "
                      "bytes (e.g. 32 hex digits)", RuntimeWarning, stacklevel=2)
    return RedisTier(config, client)
