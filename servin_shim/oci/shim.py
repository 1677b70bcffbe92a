"""The per-container shim: a coroutine that owns one container's process, output and exit.

It opens the stdio FIFOs before the runtime starts the container and has the exit monitor run
``runtime create``, so the container's exit is recorded even while no daemon runs. Then it pumps
the FIFOs into the CRI log file and waits for the exit. At the exit it drains the last output,
reports the exit code and time to its owner, and deletes the runtime's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from servin_shim.errors import NotFound
from servin_shim.oci.io import StreamPump, create_fifos
from servin_shim.oci.logs import CRILogWriter, LogRotation
from servin_shim.oci.monitor_client import MonitorClient
from servin_shim.oci.runtime import OCIRuntime

log = logging.getLogger(__name__)

#: Exit code reported when the real one is unknowable, the value containerd uses.
UNKNOWN_EXIT_CODE = 255

#: How long a container's exit, once its process is gone, may wait for the monitor's record
#: before its exit code is reported as unknown. CRI-O waits about 5 s for conmon's exit file for
#: the same reason.
ADOPTED_EXIT_GRACE = 3.0

ExitCallback = Callable[[int, int], Awaitable[None]]
BeforeDeleteCallback = Callable[[], Awaitable[None]]


def wants_terminal(bundle: Path) -> bool:
    """Return True if the bundle's process requests a terminal."""
    try:
        with open(bundle / "config.json") as f:
            return bool(json.load(f).get("process", {}).get("terminal"))
    except (OSError, ValueError):
        return False


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
        monitor: MonitorClient,
        on_exit: ExitCallback,
        before_delete: BeforeDeleteCallback | None = None,
        log_rotation: LogRotation | None = None,
    ) -> None:
        self.id = container_id
        self.bundle = bundle
        self.io_dir = io_dir
        self.log_path = log_path
        self.runtime = runtime
        self.pid = 0
        #: Wall-clock time (ns) just before ``runtime start``; 0 until then.
        self.started_at = 0
        self._monitor = monitor
        self._on_exit = on_exit
        # Runs after the exit and before ``runtime delete`` removes the cgroup, whose OOM
        # counters tell an OOM kill from other exits.
        self._before_delete = before_delete
        self._log_rotation = log_rotation
        self._stop_task: asyncio.Task[None] | None = None
        self._stop_deadline = 0.0
        self._pump: StreamPump | None = None
        self._exited: asyncio.Future[tuple[int, int]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Create and start the container; return its init pid."""
        loop = asyncio.get_running_loop()
        create_fifos(self.io_dir)
        self._pump = StreamPump(self.id, self.io_dir, self._log_writer())
        self._pump.start(loop)
        pid_file = self.bundle / "init.pid"
        argv = self.runtime.create_argv(self.id, self.bundle, pid_file=pid_file)
        console = None
        if wants_terminal(self.bundle):
            # With a terminal, runc sends the pty master to this socket and the monitor copies
            # the terminal's output into the stdout FIFO.
            console = self._monitor.console_socket(self.id)
            argv.insert(argv.index("create") + 1, f"--console-socket={console}")
        try:
            code, self.pid = await self._monitor.create(
                self.id,
                argv,
                stdout=self.io_dir / "stdout",
                stderr=self.io_dir / "stderr",
                pid_file=pid_file,
                console_socket=console,
            )
            if code != 0 or not self.pid:
                raise self.runtime.create_error(self.id, self.bundle, code)
        except BaseException:
            self._pump.close()
            self._pump = None
            raise
        self._exited = self._monitor.wait_exit(self.id)
        self._watch_pid()
        self._task = loop.create_task(self._watch(), name=f"shim-{self.id[:12]}")
        # Taken before the start: the monitor stamps an exit with its own clock, possibly
        # before ``runtime start`` has even returned here.
        self.started_at = time.time_ns()
        try:
            await self.runtime.start(self.id, bundle=self.bundle)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.runtime.kill(self.id, signal.SIGKILL)
            raise
        return self.pid

    def adopt(self, pid: int) -> None:
        """Take over a container that an earlier daemon started and that still runs."""
        loop = asyncio.get_running_loop()
        self.pid = pid
        create_fifos(self.io_dir)
        self._pump = StreamPump(self.id, self.io_dir, self._log_writer())
        self._pump.start(loop)
        self._exited = self._monitor.wait_exit(self.id)
        self._watch_pid()
        self._task = loop.create_task(self._watch(), name=f"shim-{self.id[:12]}")

    def _watch_pid(self) -> None:
        """Watch the init process itself too, for when the monitor cannot report its exit.

        If the monitor dies, its containers are re-parented to the daemon that started it, so
        the daemon's reaper collects the real exit code. Otherwise (the monitor died and this
        daemon did not start it) a pidfd still shows the exit, and after a short wait for a
        late report the exit code is unknown.
        """
        loop = asyncio.get_running_loop()
        exited = self._exited
        assert exited is not None
        reaper = self._monitor.reaper
        reaped = reaper.wait(self.pid)

        def on_reaped(fut: asyncio.Future[int]) -> None:
            if not fut.cancelled() and not exited.done():
                exited.set_result((fut.result(), time.time_ns()))

        reaped.add_done_callback(on_reaped)
        exited.add_done_callback(lambda _: reaper.cancel_wait(self.pid, reaped))

        async def unknown_exit_after_grace() -> None:
            await asyncio.sleep(ADOPTED_EXIT_GRACE)
            if not exited.done():
                log.warning("no exit status for container id=%s pid=%d, exit code unknown",
                            self.id, self.pid)
                exited.set_result((UNKNOWN_EXIT_CODE, time.time_ns()))

        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            loop.create_task(unknown_exit_after_grace())
            return

        def on_pidfd_readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            loop.create_task(unknown_exit_after_grace())

        loop.add_reader(pidfd, on_pidfd_readable)

    def _log_writer(self) -> CRILogWriter:
        # A container without a log path still has its output drained, into /dev/null.
        if self.log_path is None:
            return CRILogWriter(Path(os.devnull))
        return CRILogWriter(self.log_path, rotation=self._log_rotation)

    async def _watch(self) -> None:
        assert self._exited is not None
        code, finished = await self._exited
        if self._pump is not None:
            self._pump.close()
        if self._before_delete is not None:
            try:
                await self._before_delete()
            except Exception:
                log.exception("before-delete hook failed for container id=%s", self.id)
        log.debug("container exited id=%s pid=%d exit_code=%d", self.id, self.pid, code)
        # The exit is recorded before the runtime's state is deleted, so a slow runtime
        # command on a loaded node does not delay what ContainerStatus reports.
        try:
            await self._on_exit(code, finished)
        except Exception:
            log.exception("failed to record exit of container id=%s", self.id)
        else:
            self._monitor.forget(self.id)
        try:
            await self.runtime.delete(self.id, force=True)
        except Exception as exc:
            log.warning("failed to delete runtime state of exited container id=%s: %s",
                        self.id, exc)

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
            # runc has no state for the container any more, so signal the pid directly while it lives.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self, timeout: float, stop_signal: int = signal.SIGTERM) -> None:
        """Send ``stop_signal``, wait ``timeout`` seconds, then SIGKILL and wait for the exit.

        A timeout of 0 sends SIGKILL at once. A stop that arrives while another one waits
        sends no second signal and never moves the SIGKILL earlier: the kill happens at the
        latest deadline that any stop asked for.
        """
        deadline = time.monotonic() + max(timeout, 0)
        if self._stop_task is None or self._stop_task.done():
            self._stop_deadline = deadline
            self._stop_task = asyncio.get_running_loop().create_task(
                self._stop(timeout > 0, stop_signal), name=f"stop-{self.id[:12]}"
            )
        else:
            self._stop_deadline = max(self._stop_deadline, deadline)
            log.debug("container is already stopping id=%s, waiting until the kill deadline",
                      self.id)
        await asyncio.shield(self._stop_task)

    async def _stop(self, graceful: bool, stop_signal: int) -> None:
        if graceful:
            await self.kill(stop_signal)
            # The deadline moves later while this waits if another stop requests a longer one.
            while (remaining := self._stop_deadline - time.monotonic()) > 0:
                if await self.wait(remaining):
                    return
            log.info("container did not stop before its deadline, killing it id=%s", self.id)
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
        """Start a new log file at the log path, after kubelet renamed the current one."""
        if self._pump is not None:
            self._pump.writer.reopen()
