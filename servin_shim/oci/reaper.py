"""Child-process supervision for the daemon.

The daemon is a child subreaper (``PR_SET_CHILD_SUBREAPER``): when ``runc create`` exits, the
container's init process is re-parented to us rather than to PID 1, so we can collect its exit
status. That requires one owner of ``waitpid``: a ``waitpid(-1)`` loop would steal the statuses
that asyncio's own child watcher waits for, so servin-shim never uses
``asyncio.create_subprocess_exec`` and spawns every process through ``Reaper.spawn``.

Exit statuses that arrive before anyone waits for the pid are kept for a while as unclaimed.
A container can exit before ``runc create`` has even returned its pid, the same race that
containerd's shim handles by subscribing to exits before it starts a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

#: Seconds an unclaimed exit status is kept. Orphans of ``runc exec`` background processes are
#: reaped here too, and no caller ever waits for them, so they must expire.
UNCLAIMED_TTL = 300.0


def exit_code_from_status(status: int) -> int:
    """Convert a raw wait status into the shell convention: the code, or 128 + signal number."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


@dataclass(frozen=True)
class CompletedProcess:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


class Reaper:
    """The owner of ``waitpid`` in the daemon: it reaps every child and resolves exit futures."""

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._unclaimed: dict[int, tuple[int, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become a child subreaper and start reaping on SIGCHLD."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        # Children that exited before the handler was in place would otherwise wait forever.
        self.reap()

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        """Collect every exited child without blocking and resolve its waiters."""
        now = time.monotonic()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = exit_code_from_status(status)
            waiters = self._waiters.pop(pid, None)
            if waiters:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(code)
            else:
                self._unclaimed[pid] = (code, now)
        expired = [pid for pid, (_, at) in self._unclaimed.items() if now - at > UNCLAIMED_TTL]
        for pid in expired:
            del self._unclaimed[pid]

    def wait(self, pid: int) -> asyncio.Future[int]:
        """Return a future for the exit code of ``pid``, which must be our child or orphan."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        unclaimed = self._unclaimed.pop(pid, None)
        if unclaimed is not None:
            fut.set_result(unclaimed[0])
        else:
            self._waiters.setdefault(pid, []).append(fut)
        return fut

    def cancel_wait(self, pid: int, fut: asyncio.Future[int]) -> None:
        """Withdraw a ``wait`` that is no longer needed, so its pid entry does not linger."""
        waiters = self._waiters.get(pid)
        if waiters and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[pid]
        fut.cancel()

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
        start_new_session: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a process whose exit status only this reaper collects (never call its wait())."""
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            env=env,
            close_fds=True,
            start_new_session=start_new_session,
        )
        return proc

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
    ) -> CompletedProcess:
        """Run a command to completion and capture its output.

        On timeout the process is killed with SIGKILL, reaped, and TimeoutError is raised.
        """
        loop = asyncio.get_running_loop()
        proc = self.spawn(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            env=env,
        )
        exited = self.wait(proc.pid)
        readers = [
            _read_all(loop, pipe) for pipe in (proc.stdout, proc.stderr)
        ]
        if input is not None and proc.stdin is not None:
            readers.append(_write_all(loop, proc.stdin, input))
        try:
            results = await asyncio.wait_for(asyncio.gather(*readers, exited), timeout)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            # The reaper resolves the future once the killed process is gone; wait briefly for it
            # so no zombie stays behind.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(exited), 5)
            proc.returncode = exited.result() if exited.done() else -9
            _close_pipes(proc)
            raise
        code = int(results[-1])  # type: ignore[call-overload]
        proc.returncode = code
        _close_pipes(proc)
        stdout_data, stderr_data = results[0], results[1]
        assert isinstance(stdout_data, bytes) and isinstance(stderr_data, bytes)
        return CompletedProcess(tuple(argv), code, stdout_data, stderr_data)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


async def _read_all(loop: asyncio.AbstractEventLoop, pipe: object) -> bytes:
    """Read a pipe of ours to EOF without blocking the event loop."""
    if pipe is None:
        return b""
    reader = asyncio.StreamReader(limit=2**24)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe
    )
    try:
        return await reader.read()
    finally:
        transport.close()


async def _write_all(loop: asyncio.AbstractEventLoop, pipe: object, data: bytes) -> bytes:
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, pipe)
    try:
        transport.write(data)
    finally:
        transport.close()
    return b""
