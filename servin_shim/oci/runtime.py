"""The OCI runtime binary (runc, or crun which takes the same command line).

Each method is one runtime command. Errors from ``create`` and ``start`` come from the runtime's
JSON log (``--log``), because the container's stdio is the runtime's stdio during ``create`` and
its stderr therefore belongs to the container.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servin_shim.errors import NotFound, ServinError
from servin_shim.oci.reaper import Reaper

log = logging.getLogger(__name__)

#: Upper bound for one runtime command. ``runc create`` of a large bundle takes well under a
#: second here; a command still running after this is hung (for example on a frozen cgroup).
COMMAND_TIMEOUT = 120.0


class OCIRuntimeError(ServinError):
    """The OCI runtime binary failed; the message carries its own error text."""


@dataclass(frozen=True)
class RuntimeState:
    """The state ``runc state`` reports: created, running, paused or stopped, and the init pid."""

    id: str
    status: str
    pid: int
    bundle: str


class OCIRuntime:
    """One configured runtime handler: a binary and the root directory of its state."""

    def __init__(
        self, reaper: Reaper, *, name: str, binary: str, root: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        self.binary = binary
        self.root = root
        self._reaper = reaper
        self._extra = extra_args

    def _argv(self, *args: str, log_file: Path | None = None) -> list[str]:
        argv = [self.binary, "--root", str(self.root)]
        if log_file is not None:
            argv += ["--log", str(log_file), "--log-format", "json"]
        return argv + list(self._extra) + list(args)

    async def _run(self, *args: str, log_file: Path | None = None, **kwargs: Any) -> bytes:
        argv = self._argv(*args, log_file=log_file)
        try:
            result = await self._reaper.run(argv, timeout=COMMAND_TIMEOUT, **kwargs)
        except TimeoutError:
            raise OCIRuntimeError(
                f"{self.name} {args[0]} timed out after {COMMAND_TIMEOUT:.0f}s: {' '.join(argv)}"
            ) from None
        if result.returncode != 0:
            message = _last_log_error(log_file) or result.stderr.decode(errors="replace").strip()
            if not message:
                message = f"exit code {result.returncode} without an error message"
            raise OCIRuntimeError(f"{self.name} {args[0]} failed: {message}")
        return result.stdout

    def create_argv(self, container_id: str, bundle: Path, *, pid_file: Path) -> list[str]:
        """Return the ``create`` command line; the exit monitor runs it (see oci/monitor.py).

        The container's stdio is the command's stdio, so errors are read from the runtime's
        log file in the bundle afterwards (``create_error``).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        argv = self._argv(
            "create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id,
            log_file=bundle / "runtime.log",
        )
        if uses_systemd_cgroup(bundle):
            # A global flag, so it goes before the command name.
            argv.insert(argv.index("create"), "--systemd-cgroup")
        return argv

    def create_error(self, container_id: str, bundle: Path, code: int) -> OCIRuntimeError:
        """Build the error for a failed ``create`` from the runtime's own error in its log."""
        log_file = bundle / "runtime.log"
        message = _last_log_error(log_file)
        if not message:
            message = f"exit code {code} and no error in {log_file}"
        return OCIRuntimeError(
            f"{self.name} ({self.binary}) create of container {container_id} failed: {message}"
        )

    async def start(self, container_id: str, *, bundle: Path) -> None:
        await self._run("start", container_id, log_file=bundle / "runtime.log")

    async def kill(self, container_id: str, sig: int = signal.SIGTERM, *, all_: bool = False) -> None:
        """Send a signal to the init process (or, with ``all_``, to every process)."""
        args = ["kill"] + (["--all"] if all_ else []) + [container_id, str(int(sig))]
        try:
            await self._run(*args)
        except OCIRuntimeError as exc:
            if _is_gone(str(exc), container_id):
                raise NotFound(f"container {container_id} is not running") from exc
            raise

    async def delete(self, container_id: str, *, force: bool = False) -> None:
        """Remove the runtime's state of a container; a container it does not know is fine."""
        args = ["delete"] + (["--force"] if force else []) + [container_id]
        try:
            await self._run(*args)
        except OCIRuntimeError as exc:
            if _is_gone(str(exc), container_id):
                return
            raise

    async def state(self, container_id: str) -> RuntimeState | None:
        """Return the runtime's view of a container, or None if it does not know it."""
        try:
            out = await self._run("state", container_id)
        except OCIRuntimeError as exc:
            if _is_gone(str(exc), container_id):
                return None
            raise
        data = json.loads(out)
        return RuntimeState(
            id=data["id"], status=data["status"], pid=int(data.get("pid") or 0),
            bundle=data.get("bundle", ""),
        )

    async def list(self) -> builtins.list[RuntimeState]:
        """Return every container in this runtime root."""
        if not self.root.exists():
            return []
        out = await self._run("list", "--format", "json")
        items = json.loads(out or b"null") or []
        return [
            RuntimeState(
                id=i["id"], status=i["status"], pid=int(i.get("pid") or 0),
                bundle=i.get("bundle", ""),
            )
            for i in items
        ]

    async def version(self) -> str:
        out = await self._run("--version")
        return out.decode().splitlines()[0] if out else ""

    def exec(
        self,
        container_id: str,
        command: builtins.list[str],
        *,
        pid_file: Path,
        log_file: Path,
        stdout: int,
        stderr: int,
    ) -> subprocess.Popen[bytes]:
        """Spawn a detached ``exec`` of ``command`` in a running container.

        The new process takes the container's process spec (env, user, cwd, capabilities) with
        its args replaced, and writes straight into ``stdout`` and ``stderr``. The runtime
        exits once the process runs, leaving its host pid in ``pid_file``, and the process
        becomes a child of this subreaper daemon, so the caller waits for both through the
        reaper. Detaching matters: an attached ``runc exec`` also waits for every background
        child of the process. The runtime's own errors go to ``log_file`` (see ``last_error``).
        """
        argv = self.exec_argv(container_id, command, pid_file=pid_file, log_file=log_file)
        return self._reaper.spawn(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)

    def exec_argv(
        self,
        container_id: str,
        command: Sequence[str],
        *,
        pid_file: Path,
        log_file: Path,
        console_socket: Path | None = None,
        env: Sequence[str] = (),
    ) -> builtins.list[str]:
        """Return a detached ``exec`` command line (see ``exec``).

        With ``console_socket`` the process gets a terminal whose pty master the runtime sends
        to that socket. ``env`` entries (``KEY=value``) are added to the container's own.
        """
        options = ["--detach", "--pid-file", str(pid_file)]
        if console_socket is not None:
            options += ["--tty", "--console-socket", str(console_socket)]
        for entry in env:
            options += ["--env", entry]
        return self._argv("exec", *options, container_id, *command, log_file=log_file)

    @staticmethod
    def last_error(log_file: Path) -> str:
        """Return the last error the runtime wrote to its JSON log, or an empty string."""
        return _last_log_error(log_file)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply new resource limits (an OCI ``linux.resources`` object) to a live container."""
        await self._run(
            "update", "--resources", "-", container_id, input=json.dumps(resources).encode()
        )


def uses_systemd_cgroup(bundle: Path) -> bool:
    """Return True if the bundle's cgroupsPath has the systemd driver's ``slice:prefix:name``."""
    try:
        with open(bundle / "config.json") as f:
            path = json.load(f).get("linux", {}).get("cgroupsPath", "")
    except (OSError, ValueError):
        return False
    return isinstance(path, str) and path.count(":") == 2 and not path.startswith("/")


def _is_gone(message: str, container_id: str) -> bool:
    """Return True if a runtime error means the runtime has no such (running) container.

    runc reports ``container does not exist`` or ``container not running``. crun 1.8.1 has no
    such message. For an unknown id its kill and state fail with ``error opening file
    `<root>/<id>/status`: No such file or directory``, and delete fails with ``cannot open
    directory '<root>/<id>': No such file or directory``.
    """
    text = message.lower()
    if "does not exist" in text or "container not running" in text:
        return True
    if "no such file or directory" not in text:
        return False
    return f"/{container_id}/status" in message or f"/{container_id}'" in message


def _last_log_error(log_file: Path | None) -> str:
    """Return the last error-level message of a runtime JSON log, or an empty string.

    A runtime that fails before it sets up JSON logging writes plain text. When the log has no
    JSON error, the last such line is returned.
    """
    if log_file is None or not log_file.exists():
        return ""
    message = ""
    plain = ""
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            plain = line.strip() or plain
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message or plain


