"""A real OCI registry for tests: Debian's ``docker-registry`` on a free loopback port.

Storage is a temporary directory with deletes enabled, so tests can corrupt or remove blobs.
With ``users`` given, the registry requires HTTP Basic credentials checked against a bcrypt
htpasswd file. With ``auth`` given (such as ``TokenServer.registry_auth_config()``), that section
is the registry's auth config instead. With ``tls=True``, it serves HTTPS with a self-signed
certificate that ``openssl`` generates into its temporary directory.

``FaultProxy`` sits between a client and a registry on 127.0.0.1. It records every request and
can respond with an error status, cut a response after some bytes, stall it, or slow it down.
"""

from __future__ import annotations

import logging
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

log = logging.getLogger(__name__)

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT_SECONDS = 20.0


def bcrypt_hash(password: str) -> str:
    """Return a bcrypt hash that the registry's htpasswd check accepts."""
    try:
        import bcrypt  # type: ignore[import-not-found]

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode())
    except ImportError:
        pass
    # glibc's libxcrypt on Debian 12 implements bcrypt ($2b$), so the stdlib module suffices.
    # crypt is deprecated and removed in Python 3.13, where the bcrypt package is needed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32))


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """A running ``docker-registry serve`` process and its storage directory."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        auth: dict[str, Any] | None = None,
        tls: bool = False,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="servin-registry-"))
        self.storage = self.workdir / "data"
        self.users = dict(users or {})
        self.auth = auth
        self.tls = tls
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "registry.log"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def certificate(self) -> Path:
        """The self-signed PEM certificate the registry serves when ``tls`` is set."""
        return self.workdir / "tls.crt"

    @property
    def key(self) -> Path:
        return self.workdir / "tls.key"

    def blob_path(self, digest: str) -> Path:
        """Return where the registry stores a blob, so tests can corrupt it."""
        algorithm, hex_digest = digest.split(":", 1)
        return (
            self.storage
            / "docker/registry/v2/blobs"
            / algorithm
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    def start(self) -> Self:
        """Start the registry and wait until ``/v2/`` responds, retrying on a port clash."""
        if self.tls:
            self._write_certificate()
        for attempt in range(3):
            self.port = free_port()
            self._write_config()
            with open(self._log_path, "ab") as log_file:
                self._process = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(self.workdir / "config.yml")],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready():
                log.info("registry started host=%s pid=%d", self.host, self._process.pid)
                return self
            self._terminate()
            log.warning("registry did not start, retrying attempt=%d port=%d", attempt, self.port)
        output = self._log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"docker-registry did not start on 127.0.0.1; its log ends:\n{output}")

    def stop(self) -> None:
        """Stop the process by PID and delete the storage directory."""
        self._terminate()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self) -> None:
        process = self._process
        self._process = None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _write_config(self) -> None:
        http: dict[str, object] = {"addr": self.host, "secret": "servin-test-secret"}
        if self.tls:
            http["tls"] = {"certificate": str(self.certificate), "key": str(self.key)}
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                # No "cache" section: without a descriptor cache, the registry serves a blob
                # that a test corrupted on disk as it is. Upload purging is a needless timer.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
            # Manifests may name loopback URLs for non-distributable layers; the registry
            # rejects every such URL unless an allow pattern matches it.
            "validation": {"manifests": {"urls": {"allow": [r"^http://127\.0\.0\.1:"]}}},
        }
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            lines = [f"{user}:{bcrypt_hash(password)}\n" for user, password in self.users.items()]
            htpasswd.write_text("".join(lines))
            config["auth"] = {"htpasswd": {"realm": "servin-test", "path": str(htpasswd)}}
        if self.auth is not None:
            config["auth"] = self.auth
        (self.workdir / "config.yml").write_text(yaml.safe_dump(config))

    def _write_certificate(self) -> None:
        # A one-day P-256 certificate for the loopback names. Clients trust it only with
        # verification off or with ``certificate`` as their CA file.
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                "-subj", "/CN=servin-test-registry",
                "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
                "-keyout", str(self.key), "-out", str(self.certificate),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                # The certificate is self-signed, so readiness skips its verification.
                response = httpx.get(f"{self.url}/v2/", timeout=1.0, verify=not self.tls)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            return response.status_code in (200, 401)
        return False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class ProxiedRequest:
    """One request that passed the proxy."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Fault:
    """What to do to the next ``times`` requests whose path ends with ``path_suffix``.

    ``status`` returns that status (and ``retry_after``) without asking the registry.
    ``cut_after`` closes the connection after that many body bytes. ``stall_after`` stops
    sending after that many body bytes but keeps the connection open until the proxy stops.
    """

    path_suffix: str
    times: int = 1
    status: int | None = None
    retry_after: str | None = None
    cut_after: int | None = None
    stall_after: int | None = None


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (``HOST:PORT``) that injects faults.

    Each request goes to the upstream on a new connection with ``Connection: close``.
    ``bytes_per_second`` throttles every response body.
    """

    def __init__(self, upstream: str, bytes_per_second: float | None = None) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.bytes_per_second = bytes_per_second
        self.requests: list[ProxiedRequest] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def count(self, path_suffix: str, method: str = "GET") -> int:
        """Return how many ``method`` requests for paths ending in ``path_suffix`` passed."""
        return sum(1 for r in self.requests if r.method == method and r.path.endswith(path_suffix))

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and path.endswith(fault.path_suffix):
                    fault.times -= 1
                    return fault
        return None

    def _serve(self, client: socket.socket) -> None:
        head = _read_head(client)
        if head is None:
            return
        request_line, _, header_text = head.partition(b"\r\n")
        method, path, _ = request_line.decode().split(" ", 2)
        headers = {}
        for line in header_text.decode().split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        self.requests.append(ProxiedRequest(method, path, headers))
        fault = self._take_fault(path.split("?", 1)[0])
        if fault is not None and fault.status is not None:
            extra = f"Retry-After: {fault.retry_after}\r\n" if fault.retry_after else ""
            client.sendall(
                f"HTTP/1.1 {fault.status} Injected\r\n{extra}Content-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            client.close()
            return
        lines = [request_line.decode()]
        for name, value in headers.items():
            if name not in ("connection", "keep-alive"):
                lines.append(f"{name}: {value}")
        lines.append("Connection: close")
        upstream = socket.create_connection((self.upstream_host, self.upstream_port))
        try:
            upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            self._relay(upstream, client, fault)
        finally:
            upstream.close()
            client.close()

    def _relay(self, upstream: socket.socket, client: socket.socket, fault: Fault | None) -> None:
        response_head = _read_head(upstream)
        if response_head is None:
            return
        client.sendall(response_head + b"\r\n\r\n")
        sent = 0
        started = time.monotonic()
        while True:
            chunk = upstream.recv(65536)
            if not chunk:
                return
            limit = None
            if fault is not None:
                limit = fault.cut_after if fault.cut_after is not None else fault.stall_after
            if limit is not None and sent + len(chunk) >= limit:
                client.sendall(chunk[: max(limit - sent, 0)])
                if fault is not None and fault.stall_after is not None:
                    self._stopping.wait()
                return
            client.sendall(chunk)
            sent += len(chunk)
            if self.bytes_per_second:
                ahead = sent / self.bytes_per_second - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)


def _read_head(sock: socket.socket) -> bytes | None:
    """Read up to the blank line that ends an HTTP head, one byte at a time."""
    data = b""
    while True:
        byte = sock.recv(1)
        if not byte:
            return None
        data += byte
        if data.endswith(b"\r\n\r\n"):
            return data[:-4]
