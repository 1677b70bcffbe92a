"""A command run in a container for a streaming exec: pipes, or a terminal from a console socket.

The runtime runs ``exec --detach``, so it exits as soon as the process runs and the process
becomes a child of this subreaper daemon. Without a terminal the process gets the pipes the
runtime was started with. With one, the runtime sends the pty master over ``--console-socket``
and the process uses the slave side as its stdio.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import termios
from pathlib import Path

from servin_shim.errors import FailedPrecondition
from servin_shim.oci.reaper import Reaper
from servin_shim.oci.runtime import OCIRuntimeError
from servin_shim.streaming.requests import ExecRequest

log = logging.getLogger(__name__)

#: Seconds to wait for the runtime to send the pty master once it has exited successfully.
CONSOLE_TIMEOUT = 5.0
READ_SIZE = 32 * 1024


class ExecProcess:
    """One exec'd process and the host ends of its stdio.

    With a terminal, ``stdin_fd`` and ``stdout_fd`` are the same pty master and ``stderr_fd``
    is None. Every fd is non-blocking.
    """

    def __init__(self, request: ExecRequest, pid: int, exited: asyncio.Future[int],
                 exec_dir: Path) -> None:
        self.request = request
        self.pid = pid
        self.exited = exited
        self.exec_dir = exec_dir
        self.stdin_fd: int | None = None
        self.stdout_fd: int | None = None
        self.stderr_fd: int | None = None
        self.master: int | None = None

    @classmethod
    async def start(cls, request: ExecRequest, reaper: Reaper) -> ExecProcess:
        """Start the command; raises OCIRuntimeError or FailedPrecondition when it cannot run."""
        exec_dir = request.work_dir / secrets.token_hex(8)
        exec_dir.mkdir(parents=True)
        try:
            if request.tty:
                return await cls._start_tty(request, reaper, exec_dir)
            return await cls._start_pipes(request, reaper, exec_dir)
        except BaseException:
            shutil.rmtree(exec_dir, ignore_errors=True)
            raise

    @classmethod
    async def _start_pipes(cls, request: ExecRequest, reaper: Reaper,
                           exec_dir: Path) -> ExecProcess:
        ours: dict[str, int] = {}
        theirs: dict[str, int] = {}
        for name, requested, child_reads in (("stdin", request.stdin, True),
                                          ("stdout", request.stdout, False),
                                          ("stderr", request.stderr, False)):
            if not requested:
                continue
            read_end, write_end = os.pipe()
            ours[name], theirs[name] = (write_end, read_end) if child_reads else (read_end,
                                                                                  write_end)
        try:
            argv = request.runtime.exec_argv(
                request.container_id, request.cmd, pid_file=exec_dir / "exec.pid",
                log_file=exec_dir / "runtime.log",
            )
            proc = reaper.spawn(
                argv,
                stdin=theirs.get("stdin", subprocess.DEVNULL),
                stdout=theirs.get("stdout", subprocess.DEVNULL),
                stderr=theirs.get("stderr", subprocess.DEVNULL),
            )
        except BaseException:
            for fd in ours.values():
                os.close(fd)
            raise
        finally:
            for fd in theirs.values():
                os.close(fd)
        try:
            pid = await _wait_runtime(request, reaper.wait(proc.pid), exec_dir)
        except BaseException:
            for fd in ours.values():
                os.close(fd)
            raise
        process = cls(request, pid, reaper.wait(pid), exec_dir)
        for fd in ours.values():
            os.set_blocking(fd, False)
        process.stdin_fd = ours.get("stdin")
        process.stdout_fd = ours.get("stdout")
        process.stderr_fd = ours.get("stderr")
        return process

    @classmethod
    async def _start_tty(cls, request: ExecRequest, reaper: Reaper,
                         exec_dir: Path) -> ExecProcess:
        loop = asyncio.get_running_loop()
        request.socket_dir.mkdir(parents=True, exist_ok=True)
        socket_path = request.socket_dir / f"{secrets.token_hex(8)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(socket_path))
            listener.listen(1)
            listener.setblocking(False)
            argv = request.runtime.exec_argv(
                request.container_id, request.cmd, pid_file=exec_dir / "exec.pid",
                log_file=exec_dir / "runtime.log", console_socket=socket_path,
                env=("TERM=xterm",),
            )
            proc = reaper.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
            accepted = asyncio.ensure_future(loop.sock_accept(listener))
            try:
                pid = await _wait_runtime(request, reaper.wait(proc.pid), exec_dir)
                conn, _ = await asyncio.wait_for(accepted, CONSOLE_TIMEOUT)
            finally:
                accepted.cancel()
            with conn:
                conn.settimeout(CONSOLE_TIMEOUT)
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        finally:
            listener.close()
            socket_path.unlink(missing_ok=True)
        if not fds:
            raise OCIRuntimeError(
                f"{request.runtime.name} sent no terminal for exec in container "
                f"{request.container_id}"
            )
        process = cls(request, pid, reaper.wait(pid), exec_dir)
        os.set_blocking(fds[0], False)
        process.master = process.stdin_fd = process.stdout_fd = fds[0]
        return process

    def resize(self, width: int, height: int) -> None:
        """Set the terminal size in columns and rows; without a terminal this does nothing."""
        if self.master is None:
            return
        try:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        except OSError as exc:
            log.warning("failed to resize exec terminal id=%s pid=%d: %s",
                        self.request.container_id, self.pid, exc)
            return
        log.debug("resized exec terminal id=%s pid=%d width=%d height=%d",
                  self.request.container_id, self.pid, width, height)

    def close_stdin(self) -> None:
        """Close the process's stdin pipe (a terminal stays open until the process exits)."""
        if self.stdin_fd is not None and self.stdin_fd != self.master:
            os.close(self.stdin_fd)
        self.stdin_fd = None if self.master is None else self.stdin_fd

    def close(self) -> None:
        for fd in {self.stdin_fd, self.stdout_fd, self.stderr_fd, self.master} - {None}:
            with contextlib.suppress(OSError):
                os.close(fd)  # type: ignore[arg-type]
        self.stdin_fd = self.stdout_fd = self.stderr_fd = self.master = None
        shutil.rmtree(self.exec_dir, ignore_errors=True)


async def _wait_runtime(request: ExecRequest, exited: asyncio.Future[int], exec_dir: Path) -> int:
    """Wait for ``runtime exec --detach`` and return the pid of the process it started."""
    code = await exited
    if code != 0:
        message = request.runtime.last_error(exec_dir / "runtime.log") or f"exit code {code}"
        if "stopped container" in message or "not running" in message:
            raise FailedPrecondition(f"container {request.container_id} is not running: {message}")
        raise OCIRuntimeError(
            f"{request.runtime.name} exec of {request.cmd[0]!r} in container "
            f"{request.container_id} failed: {message}"
        )
    return int((exec_dir / "exec.pid").read_text().strip())


async def wait_fd(fd: int, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable with ``write``)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def read_fd(fd: int) -> bytes | None:
    """Read what ``fd`` has now: data, b"" at end of file, or None if nothing is there yet."""
    try:
        return os.read(fd, READ_SIZE)
    except BlockingIOError:
        return None
    except OSError as exc:
        # A pty master reads EIO once the last slave fd closed, which is its end of file.
        if exc.errno == errno.EIO:
            return b""
        raise


async def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await wait_fd(fd, write=True)
            continue
        view = view[written:]
