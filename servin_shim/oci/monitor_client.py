"""The daemon's side of the exit monitor (see oci/monitor.py).

The client starts the monitor when nothing accepts connections on its socket, sends it a
``runc create`` request for each container, and turns its exit messages and exit files into futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

from servin_shim.errors import ServinError, Unavailable
from servin_shim.oci.monitor import exit_file, read_exit
from servin_shim.oci.reaper import Reaper

log = logging.getLogger(__name__)

#: How long a new monitor gets to open its socket.
START_TIMEOUT = 10.0

ExitStatus = tuple[int, int]


class MonitorClient:
    """One connection to the monitor of a state directory."""

    def __init__(self, state_dir: Path, reaper: Reaper) -> None:
        self.state_dir = state_dir
        self.socket_path = state_dir / "monitor.sock"
        self._reaper = reaper
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._created: dict[str, asyncio.Future[tuple[int, int]]] = {}
        self._waiters: dict[str, list[asyncio.Future[ExitStatus]]] = {}
        self._connect_lock = asyncio.Lock()

    @property
    def reaper(self) -> Reaper:
        """The daemon's reaper, which inherits the containers if the monitor dies."""
        return self._reaper

    def _accepting(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    async def connect(self) -> None:
        """Connect to the monitor, starting one if none runs."""
        async with self._connect_lock:
            if self._writer is not None and not self._writer.is_closing():
                return
            if not self._accepting():
                await self._start_monitor()
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read(reader), name="monitor-reader"
            )
            # Exits recorded while we were not connected are in files.
            for container_id in list(self._waiters):
                self._resolve_from_file(container_id)

    async def _start_monitor(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "monitor.log", "ab") as log_file:
            # A new session keeps a Ctrl-C or SIGTERM aimed at the daemon's group away from it.
            self._reaper.spawn(
                [sys.executable, "-m", "servin_shim.oci.monitor", str(self.state_dir)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepting():
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the exit monitor did not open {self.socket_path} within "
                    f"{START_TIMEOUT:.0f}s: see {self.state_dir / 'monitor.log'}"
                )
            await asyncio.sleep(0.02)
        log.info("started exit monitor socket=%s", self.socket_path)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                message = json.loads(line)
            except ValueError:
                log.error("invalid message from the exit monitor: %r", line[:200])
                continue
            op = message.get("op")
            container_id = str(message.get("id", ""))
            if op == "created":
                fut = self._created.pop(container_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((int(message["code"]), int(message.get("pid") or 0)))
            elif op == "exit":
                self._resolve(container_id, (int(message["code"]), int(message["finished_at"])))
        log.error(
            "connection to the exit monitor closed; running containers are watched by the "
            "daemon until they exit, and a new monitor starts at the next create"
        )
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        for fut in self._created.values():
            if not fut.done():
                fut.set_exception(Unavailable("the exit monitor closed its connection"))
        self._created.clear()

    async def create(
        self, container_id: str, argv: list[str], *, stdout: Path | None, stderr: Path | None,
        pid_file: Path, console_socket: Path | None = None,
    ) -> tuple[int, int]:
        """Run a ``runtime create`` command in the monitor; return its exit code and init pid."""
        await self.connect()
        assert self._writer is not None
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._created[container_id] = fut
        message = {
            "op": "create", "id": container_id, "argv": argv,
            "stdout": str(stdout) if stdout else "", "stderr": str(stderr) if stderr else "",
            "pid_file": str(pid_file),
            "console_socket": str(console_socket) if console_socket else "",
        }
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()
        try:
            return await fut
        finally:
            self._created.pop(container_id, None)

    def wait_exit(self, container_id: str) -> asyncio.Future[ExitStatus]:
        """Return a future for ``(exit code, finished_at ns)`` of a container's init process."""
        fut: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(container_id, []).append(fut)
        self._resolve_from_file(container_id)
        return fut

    def console_socket(self, container_id: str) -> Path:
        """Return the console socket path for a container with a terminal.

        Unix socket paths are limited to 107 bytes, so it lives in a short folder under the
        state directory, named by the start of the container id.
        """
        return self.state_dir / "console" / f"{container_id[:24]}.sock"

    def recorded_exit(self, container_id: str) -> ExitStatus | None:
        """Return the exit the monitor wrote to disk for a container, if any."""
        return read_exit(self.state_dir, container_id)

    def forget(self, container_id: str) -> None:
        """Release a container whose exit is stored and whose last output was read.

        The monitor closes its hold on the container's FIFOs, and the exit file is deleted.
        """
        exit_file(self.state_dir, container_id).unlink(missing_ok=True)
        if self._writer is not None and not self._writer.is_closing():
            message = {"op": "release", "id": container_id}
            self._writer.write(json.dumps(message).encode() + b"\n")

    def _resolve_from_file(self, container_id: str) -> None:
        recorded = read_exit(self.state_dir, container_id)
        if recorded is not None:
            self._resolve(container_id, recorded)

    def _resolve(self, container_id: str, status: ExitStatus) -> None:
        for fut in self._waiters.pop(container_id, []):
            if not fut.done():
                fut.set_result(status)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServinError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            self._writer = None
