"""A real servin-shim daemon for end-to-end tests, and the cleanup that keeps the machine clean.

Each daemon gets its own root, state directory, runtime roots and socket under a short
temporary directory, so nothing it does touches a system-wide runtime. ``cleanup`` removes what
a failed test may leave: runtime containers, mounts and processes under those directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from grpclib.client import Channel

from servin_shim.api.runtime import v1 as cri
from servin_shim.oci.cgroups import remove_cgroup
from servin_shim.oci.resources import pod_cgroup_parent

START_TIMEOUT = 30.0
SERVIN_BINARY = str(Path(sys.executable).parent / "servin-shim")


def mounts_under(prefix: Path) -> list[str]:
    """Return mount points below ``prefix``, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4].encode().decode("unicode_escape")
            if point == str(prefix) or point.startswith(str(prefix) + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


class Daemon:
    """One servin-shim process with private directories; use as a context manager."""

    def __init__(self, config: dict | None = None, *, workdir: Path | None = None) -> None:
        # Unix socket paths are limited to 107 bytes, so stay short and under /tmp.
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="svd-", dir="/tmp"))
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.socket = self.state / "cri.sock"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_file = self.workdir / "daemon.log"
        self.config_path = self.workdir / "cri-config.yaml"
        document = {"apiVersion": "v1", "kind": "ServinCRIConfig", "spec": config or {}}
        self.config_path.write_text(yaml.safe_dump(document))
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None

    def start(self) -> Daemon:
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            [SERVIN_BINARY, "--cri-config", str(self.config_path), "--root", str(self.root),
             "--state-dir", str(self.state), "--cri-socket", str(self.socket),
             "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepting():
            if self.process.poll() is not None:
                raise RuntimeError(f"servin-shim exited at start:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"servin-shim did not open its socket:\n{self.log_text()}")
            time.sleep(0.05)
        self.channel = Channel(path=str(self.socket))
        return self

    def _accepting(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    @property
    def runtime(self) -> cri.RuntimeServiceStub:
        assert self.channel is not None
        return cri.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> cri.ImageServiceStub:
        assert self.channel is not None
        return cri.ImageServiceStub(self.channel)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Stop the daemon process (SIGTERM for a graceful stop, SIGKILL for a crash)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def runc_containers(self) -> list[str]:
        """Return the ids of runc containers in this daemon's runc root."""
        root = self.state / "runc"
        if not root.exists():
            return []
        out = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                             capture_output=True, check=False).stdout
        return [c["id"] for c in json.loads(out or b"null") or []]

    def mounts(self) -> list[str]:
        return mounts_under(self.workdir)

    def cleanup(self) -> None:
        """Stop the daemon and remove every container, mount and file it left."""
        self.stop()
        for handler in ("runc", "crun"):
            root = self.state / handler
            if not root.exists():
                continue
            out = subprocess.run([handler, "--root", str(root), "list", "--format", "json"],
                                 capture_output=True, check=False).stdout
            for item in json.loads(out or b"null") or []:
                subprocess.run([handler, "--root", str(root), "delete", "--force", item["id"]],
                               capture_output=True, check=False)
        self.kill_monitor()
        # runc removes each container's cgroup, not the pod cgroup above them that the daemon
        # would remove with RemovePodSandbox.
        sandboxes = self.state / "sandboxes"
        if sandboxes.exists():
            for sandbox in sandboxes.iterdir():
                remove_cgroup(pod_cgroup_parent("", sandbox.name))
        for point in mounts_under(self.workdir):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.workdir)], check=False)

    def monitor_pid(self) -> int | None:
        """Return the pid of the exit monitor this daemon started, if it still runs."""
        try:
            pid = int((self.state / "monitor.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def kill_monitor(self) -> None:
        pid = self.monitor_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def process_alive(pid: int) -> bool:
    """Return True if ``pid`` runs; a zombie waiting for its parent to reap it counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
