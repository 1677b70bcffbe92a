"""The per-container shim: a coroutine that owns one container's process, output and exit.

It opens the stdio FIFOs before the runtime starts the container, pumps them into the CRI log
file, waits for the init process to exit through the reaper, drains the last output, deletes the
runtime's state and reports the exit code and time to its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from servin_shim.errors import NotFound
from servin_shim.oci.io import StreamPump, create_fifos, open_writer_fds
from servin_shim.oci.logs import CRILogWriter
from servin_shim.oci.reaper import Reaper
from servin_shim.oci.runtime import OCIRuntime

log = logging.getLogger(__name__)

#: Exit code reported when the real one is unknowable, the value containerd uses.
UNKNOWN_EXIT_CODE = 255

ExitCallback = Callable[[int, int], Awaitable[None]]


class ContainerShim:
    """Supervises one container (or pod infra process) from ``runtime create`` to its exit."""

    def __init__(
        self,
        container_id: str,
        *,
        bundle: Path,
        io_dir: Path,
        log_path: Path | None,
        runtime: OCIRuntime,
        reaper: Reaper,
        on_exit: ExitCallback,
    ) -> None:
        self.id = container_id
        self.bundle = bundle
        self.io_dir = io_dir
        self.log_path = log_path
        self.runtime = runtime
        self.pid = 0
        self._reaper = reaper
        self._on_exit = on_exit
        self._pump: StreamPump | None = None
        self._exited: asyncio.Future[int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Create and start the container; return its init pid."""
        loop = asyncio.get_running_loop()
        create_fifos(self.io_dir)
        self._pump = StreamPump(self.id, self.io_dir, self._log_writer())
        self._pump.start(loop)
        writers = open_writer_fds(self.io_dir)
        try:
            self.pid = await self.runtime.create(
                self.id,
                self.bundle,
                pid_file=self.bundle / "init.pid",
                stdout_fd=writers["stdout"],
                stderr_fd=writers["stderr"],
            )
        except BaseException:
            self._pump.close()
            raise
        finally:
            for fd in writers.values():
                os.close(fd)
        self._exited = self._reaper.wait(self.pid)
        self._task = loop.create_task(self._watch(), name=f"shim-{self.id[:12]}")
        try:
            await self.runtime.start(self.id, bundle=self.bundle)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.runtime.kill(self.id, signal.SIGKILL)
            raise
        return self.pid

    def adopt(self, pid: int) -> None:
        """Take over a container that an earlier daemon started and that still runs.

        That container's init is no child of ours, so its exit is seen through a pidfd and its
        exit code cannot be known.
        """
        loop = asyncio.get_running_loop()
        self.pid = pid
        create_fifos(self.io_dir)
        self._pump = StreamPump(self.id, self.io_dir, self._log_writer())
        self._pump.start(loop)
        self._exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited.set_result(UNKNOWN_EXIT_CODE)
        else:
            def on_pidfd_readable() -> None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                if self._exited is not None and not self._exited.done():
                    self._exited.set_result(UNKNOWN_EXIT_CODE)

            loop.add_reader(pidfd, on_pidfd_readable)
        self._task = loop.create_task(self._watch(), name=f"shim-{self.id[:12]}")

    def _log_writer(self) -> CRILogWriter:
        # A container without a log path still has its output drained, into /dev/null.
        return CRILogWriter(self.log_path if self.log_path else Path(os.devnull))

    async def _watch(self) -> None:
        assert self._exited is not None
        code = await self._exited
        finished = time.time_ns()
        if self._pump is not None:
            self._pump.close()
        try:
            await self.runtime.delete(self.id, force=True)
        except Exception as exc:
            log.warning("failed to delete runtime state of exited container id=%s: %s",
                        self.id, exc)
        log.debug("container exited id=%s pid=%d exit_code=%d", self.id, self.pid, code)
        try:
            await self._on_exit(code, finished)
        except Exception:
            log.exception("failed to record exit of container id=%s", self.id)

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the exit is recorded; return False if ``timeout`` passed first."""
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            return False
        return True

    async def kill(self, sig: int) -> None:
        """Signal the container's init process; a container that is already gone is fine."""
        if not self.running:
            return
        try:
            await self.runtime.kill(self.id, sig)
        except NotFound:
            # runc no longer knows the container: signal the pid directly while it lives.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self, timeout: float, stop_signal: int = signal.SIGTERM) -> None:
        """Send ``stop_signal``, wait ``timeout`` seconds, then SIGKILL and wait for the exit."""
        if timeout > 0:
            await self.kill(stop_signal)
            if await self.wait(timeout):
                return
            log.info("container did not stop within %ss, killing it id=%s", timeout, self.id)
        await self.kill(signal.SIGKILL)
        await self.wait()

    def detach(self) -> None:
        """Stop supervising without touching the container, for a daemon that shuts down.

        Unread output stays in the FIFOs, and an unfinished line is written as a ``P`` record,
        which the next daemon's records continue.
        """
        if self._task is not None:
            self._task.cancel()
        if self._pump is not None:
            self._pump.close()
            self._pump = None

    def reopen_log(self) -> None:
        if self._pump is not None:
            self._pump.writer.reopen()
