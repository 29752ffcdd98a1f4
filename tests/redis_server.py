"""A real redis-server for tests and benchmarks: its own process on 127.0.0.1, a free port, a
temporary directory, no persistence. Optionally with a password or TLS (self-signed certificate
made with the openssl command line)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_redis_server() -> bool:
    return shutil.which("redis-server") is not None


def make_tls_files(directory: Path) -> dict:
    """A self-signed CA and a server certificate for 127.0.0.1, made with openssl."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True,  # noqa: E731
                                       capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.crt")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


class RedisServer:
    """``start()``, ``kill()`` (SIGKILL, as a crash), ``stop()``, ``url``, ``client()``.

    A restarted server keeps its port (and is empty: nothing is persisted)."""

    def __init__(self, directory: Path, password: str | None = None, tls: dict | None = None,
                 extra_args: tuple = ()):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _args(self) -> list:
        args = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                "--appendonly", "no", "--protected-mode", "no"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls["cert"]),
                     "--tls-key-file", str(self.tls["key"]), "--tls-ca-cert-file", str(self.tls["ca"]),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def start(self, timeout: float = 15.0) -> "RedisServer":
        log = open(self.directory / "redis.log", "ab")
        self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}):\n"
                                   + (self.directory / "redis.log").read_text()[-2000:])
            try:
                if self.client().ping():
                    return self
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise
            time.sleep(0.02)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class SilentServer:
    """A listening socket that accepts connections and never reads or answers: the worst kind
    of broken server (a hung process, a half-open proxy)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)  # the kernel completes handshakes into the backlog; nobody reads
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.sock.close()


class SlowServer:
    """Speaks just enough RESP to look like an empty Redis, answering every command after
    ``delay`` seconds: each socket wait stays under a client's socket timeout, so only a deadline
    on the whole operation (connect, AUTH, SELECT, GET...) bounds what a lookup costs."""

    def __init__(self, delay: float):
        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.commands: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://:pw@127.0.0.1:{self.port}/3"  # AUTH and SELECT before every first GET

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        f = conn.makefile("rb")
        try:
            while True:
                head = f.readline()
                if not head.startswith(b"*"):
                    return
                args = []
                for _ in range(int(head[1:])):
                    n = int(f.readline()[1:])
                    args.append(f.read(n + 2)[:-2])
                name = args[0].upper()
                self.commands.append(name.decode())
                time.sleep(self.delay)
                reply = {b"GET": b"$-1\r\n", b"EXPIRE": b":0\r\n"}.get(name, b"+OK\r\n")
                conn.sendall(reply)
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
