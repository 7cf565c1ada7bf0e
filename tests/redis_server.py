"""A real redis-server for tests and benchmarks, on a free port, in its own temp dir.

`RedisServer(persistent=True)` runs with `appendonly yes` (and `appendfsync always`, so
even a SIGKILL loses no acknowledged write); `stop()` and `start()` again reuse the same
port and directory, so data survives a restart. Optional TLS (self-signed CA made with
openssl) and `requirepass`. Fixtures: `redis_server` (module-scoped, no persistence) and
`persistent_redis` (function-scoped).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tls_material(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""
    d = directory
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
         "-keyout", str(ca_key), "-out", str(ca_crt)],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key),
         "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "2", "-extfile", str(ext), "-out", str(crt)],
    ]  # fmt: skip
    for cmd in run:
        subprocess.run(cmd, check=True, capture_output=True)
    return {"ca": ca_crt, "cert": crt, "key": key}


class RedisServer:
    def __init__(
        self,
        *,
        persistent: bool = False,
        password: str | None = None,
        tls: bool = False,
        sentinel_for: RedisServer | None = None,
    ) -> None:
        self.persistent = persistent
        self.password = password
        self.tls = tls
        self.sentinel_for = sentinel_for  # run as a Sentinel monitoring that server as "mymaster"
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.tls_files = make_tls_material(self.dir) if tls else {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def _config(self) -> str:
        lines = [f"dir {self.dir}", "bind 127.0.0.1", "protected-mode no", 'save ""', "daemonize no",
                 f"logfile {self.dir / 'redis.log'}"]  # fmt: skip
        if self.sentinel_for is not None:
            m = self.sentinel_for
            return "\n".join(
                [f"port {self.port}", f"dir {self.dir}", "bind 127.0.0.1", "protected-mode no",
                 f"logfile {self.dir / 'sentinel.log'}",
                 f"sentinel monitor mymaster 127.0.0.1 {m.port} 1"]
                + ([f"sentinel auth-pass mymaster {m.password}"] if m.password else [])
            ) + "\n"  # fmt: skip
        if self.tls:
            f = self.tls_files
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {f['cert']}", f"tls-key-file {f['key']}",
                      f"tls-ca-cert-file {f['ca']}", "tls-auth-clients no"]  # fmt: skip
        else:
            lines.append(f"port {self.port}")
        if self.persistent:
            lines += ["appendonly yes", "appendfsync always"]
        else:
            lines.append("appendonly no")
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        conf = self.dir / ("sentinel.conf" if self.sentinel_for else "redis.conf")
        conf.write_text(self._config())
        cmd = [REDIS_SERVER, str(conf)] + (["--sentinel"] if self.sentinel_for else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.dir / "redis.log"
                raise RuntimeError(f"redis-server exited: {err} {log.read_text() if log.exists() else ''}")
            if self._accepts():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not come up in {timeout_s} s")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (Redis flushes the AOF and exits) or SIGKILL (a crash)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        deadline = time.monotonic() + 5
        while self._accepts() and time.monotonic() < deadline:
            time.sleep(0.05)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True).start()
    try:
        yield server
    finally:
        server.cleanup()
