"""ExecSync: run a command in a running container and return its output and exit code.

kubelet's exec probes call it, so a command that runs past its timeout is killed and the RPC
fails with DEADLINE_EXCEEDED. The call returns when the exec'd process exits, even if a
background child of it keeps stdout or stderr open. The output is read while the process runs,
and once it has exited the pipes are drained without waiting for end of file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from servin_shim.errors import DeadlineExceeded, FailedPrecondition
from servin_shim.oci.reaper import Reaper
from servin_shim.oci.runtime import OCIRuntime, OCIRuntimeError

log = logging.getLogger(__name__)

#: Bytes kept of each of stdout and stderr. The rest is read and discarded, so the command never
#: blocks on a full pipe.
#: NOTE: kubelet's CRI client (k8s.io/cri-client) accepts replies of at most 16 MiB, so a reply
#: near this cap reaches kubelet as an error. Probe commands print far less.
MAX_OUTPUT = 16 * 1024 * 1024

#: How long to wait for ``runtime exec`` to exit after its process was killed (seconds).
KILL_GRACE = 5.0

READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class ExecResult:
    """Output and exit code of one ExecSync command."""

    stdout: bytes
    stderr: bytes
    exit_code: int


class OutputCapture:
    """Reads one pipe from the event loop, keeping at most ``limit`` bytes."""

    def __init__(self, fd: int, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.limit = limit
        self.discarded = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._loop = loop
        self._eof = False
        loop.add_reader(fd, self.drain)

    def drain(self) -> None:
        """Read all data that is in the pipe right now, without waiting for more."""
        while not self._eof:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                log.warning("failed to read exec output fd=%d: %s", self.fd, exc)
                data = b""
            if not data:
                # A closed write end keeps the pipe readable, so stop watching it.
                self._eof = True
                self._loop.remove_reader(self.fd)
                return
            kept = data[: self.limit - self._size]
            if kept:
                self._chunks.append(kept)
                self._size += len(kept)
            self.discarded += len(data) - len(kept)

    def close(self) -> bytes:
        """Take the last readable bytes, stop reading and return the captured output."""
        self.drain()
        if not self._eof:
            self._loop.remove_reader(self.fd)
        os.close(self.fd)
        return b"".join(self._chunks)


async def exec_sync(
    runtime: OCIRuntime,
    reaper: Reaper,
    container_id: str,
    command: list[str],
    *,
    work_dir: Path,
    timeout: float,
    max_output: int = MAX_OUTPUT,
) -> ExecResult:
    """Run ``command`` in a running container and wait for its exit.

    ``timeout`` is in seconds, and 0 means no timeout. ``work_dir`` gets the pid and log files
    of this exec in a new subdirectory, which is removed afterwards. Raises DeadlineExceeded
    when the command was killed at the timeout, FailedPrecondition when the container stopped
    running, and OCIRuntimeError when the runtime could not start the command (for example an
    executable not found).
    """
    loop = asyncio.get_running_loop()
    exec_dir = work_dir / secrets.token_hex(8)
    exec_dir.mkdir(parents=True)
    pid_file = exec_dir / "exec.pid"
    log_file = exec_dir / "runtime.log"
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        proc = runtime.exec(
            container_id, command, pid_file=pid_file, log_file=log_file,
            stdout=out_write, stderr=err_write,
        )
    except BaseException:
        for fd in (out_read, err_read):
            os.close(fd)
        shutil.rmtree(exec_dir, ignore_errors=True)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    runtime_exited = reaper.wait(proc.pid)
    stdout = OutputCapture(out_read, max_output, loop)
    stderr = OutputCapture(err_read, max_output, loop)
    deadline = loop.time() + timeout if timeout > 0 else None
    process_exited: asyncio.Future[int] | None = None
    try:
        try:
            runtime_code = await _wait(runtime_exited, deadline, loop)
            if runtime_code != 0:
                _raise_runtime_error(runtime, log_file, runtime_code, container_id, command)
            process_exited = reaper.wait(int(pid_file.read_text().strip()))
            code = await _wait(process_exited, deadline, loop)
        except (TimeoutError, asyncio.CancelledError):
            await _kill_exec(proc.pid, runtime_exited, pid_file, process_exited, container_id)
            raise
    except TimeoutError:
        raise DeadlineExceeded(
            f"command {command[0]!r} in container {container_id} timed out after {timeout}s "
            "and was killed: raise the timeout or fix the command"
        ) from None
    finally:
        out = stdout.close()
        err = stderr.close()
        shutil.rmtree(exec_dir, ignore_errors=True)
    for name, capture in (("stdout", stdout), ("stderr", stderr)):
        if capture.discarded:
            log.warning("exec output truncated id=%s stream=%s kept=%d discarded=%d",
                        container_id, name, max_output, capture.discarded)
    return ExecResult(stdout=out, stderr=err, exit_code=code)


async def _wait(
    exited: asyncio.Future[int], deadline: float | None, loop: asyncio.AbstractEventLoop
) -> int:
    """Wait for an exit code until the loop time ``deadline`` (None waits without limit)."""
    timeout = None if deadline is None else max(deadline - loop.time(), 0)
    return await asyncio.wait_for(asyncio.shield(exited), timeout)


def _raise_runtime_error(
    runtime: OCIRuntime, log_file: Path, code: int, container_id: str, command: list[str]
) -> None:
    message = runtime.last_error(log_file) or f"exit code {code}"
    if "stopped container" in message or "not running" in message:
        raise FailedPrecondition(f"container {container_id} is not running: {message}")
    raise OCIRuntimeError(
        f"{runtime.name} exec of {command[0]!r} in container {container_id} failed: {message}"
    )


async def _kill_exec(
    runtime_pid: int,
    runtime_exited: asyncio.Future[int],
    pid_file: Path,
    process_exited: asyncio.Future[int] | None,
    container_id: str,
) -> None:
    """Kill the exec'd process, or the runtime if it has not started the process yet."""
    if process_exited is None:
        # The runtime is still starting the process: kill it, then the process if it exists.
        with contextlib.suppress(ProcessLookupError):
            os.kill(runtime_pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(runtime_exited), KILL_GRACE)
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
    else:
        pid = int(pid_file.read_text().strip())
    log.info("killing exec process at timeout id=%s pid=%d", container_id, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if process_exited is not None:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(process_exited), KILL_GRACE)
