"""A real OCI registry for tests: Debian's ``docker-registry`` on a free loopback port.

Storage is a temporary directory with deletes enabled, so tests can corrupt or remove blobs.
With ``users`` given, the registry requires HTTP Basic credentials checked against a bcrypt
htpasswd file.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Self

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

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="servin-registry-"))
        self.storage = self.workdir / "data"
        self.users = dict(users or {})
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "registry.log"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

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
            "http": {"addr": self.host, "secret": "servin-test-secret"},
        }
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            lines = [f"{user}:{bcrypt_hash(password)}\n" for user, password in self.users.items()]
            htpasswd.write_text("".join(lines))
            config["auth"] = {"htpasswd": {"realm": "servin-test", "path": str(htpasswd)}}
        (self.workdir / "config.yml").write_text(yaml.safe_dump(config))

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                response = httpx.get(f"{self.url}/v2/", timeout=1.0)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            return response.status_code in (200, 401)
        return False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
