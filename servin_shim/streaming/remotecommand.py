"""Exec over SPDY with the Kubernetes remotecommand protocols (channel.k8s.io, v2 to v4).

The client opens an ``error`` stream, then ``stdin``, ``stdout`` and ``stderr`` as requested,
and ``resize`` for a terminal (v3 and later), each named by its ``streamType`` header. Once all
have arrived the command runs, and its output is copied until the process exits. Then the exit
status goes to the error stream, as a JSON Status in v4 and as plain failure text before v4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from typing import Any

from servin_shim.errors import ServinError
from servin_shim.oci.reaper import Reaper
from servin_shim.streaming.process import ExecProcess, read_fd, wait_fd, write_fd
from servin_shim.streaming.requests import ExecRequest
from servin_shim.streaming.spdy import SpdyConnection, SpdyStream

log = logging.getLogger(__name__)

PROTOCOL_V1 = "channel.k8s.io"
PROTOCOL_V2 = "v2.channel.k8s.io"
PROTOCOL_V3 = "v3.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
#: Protocols this server speaks, newest first; the first one the client offers wins.
PROTOCOLS = (PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1)

#: Seconds the client has to open every stream it announced.
STREAM_CREATION_TIMEOUT = 30.0

#: Seconds to keep reading a terminal after the process exited, for output still in transit.
TTY_LINGER = 0.5


def success_status() -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"}


def exit_code_status(code: int, cmd: tuple[str, ...]) -> dict[str, Any]:
    """Return the v4 Status kubectl turns into its own exit code."""
    return {
        "metadata": {},
        "status": "Failure",
        "message": (f"command terminated with non-zero exit code: command {' '.join(cmd)!r} "
                    f"exited with {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def internal_error_status(message: str) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def parse_resize(buffer: str) -> tuple[list[tuple[int, int]], str]:
    """Decode the complete ``{"Width":w,"Height":h}`` objects at the start of ``buffer``.

    Returns the (width, height) pairs and the unparsed rest, which may be a partial object.
    """
    decoder = json.JSONDecoder()
    sizes: list[tuple[int, int]] = []
    while True:
        buffer = buffer.lstrip()
        if not buffer:
            return sizes, ""
        try:
            value, end = decoder.raw_decode(buffer)
        except json.JSONDecodeError:
            return sizes, buffer
        buffer = buffer[end:]
        if isinstance(value, dict):
            sizes.append((int(value.get("Width", 0)), int(value.get("Height", 0))))


class ExecSession:
    """One exec on one SPDY connection: collects the streams, runs the command, reports."""

    def __init__(self, request: ExecRequest, protocol: str, reaper: Reaper) -> None:
        self.request = request
        self.protocol = protocol
        self.reaper = reaper
        self.streams: dict[str, SpdyStream] = {}
        self.expected = {"error"}
        for name, wanted in (("stdin", request.stdin), ("stdout", request.stdout),
                             ("stderr", request.stderr)):
            if wanted:
                self.expected.add(name)
        if request.tty and protocol != PROTOCOL_V1 and protocol != PROTOCOL_V2:
            self.expected.add("resize")
        self.ready = asyncio.Event()

    def on_stream(self, stream: SpdyStream) -> None:
        kind = stream.header("streamType")
        if kind not in self.expected or kind in self.streams:
            log.warning("rejecting unexpected exec stream id=%s stream_type=%r",
                        self.request.container_id, kind)
            stream.reject()
            return
        stream.accept()
        self.streams[kind] = stream
        if set(self.streams) == self.expected:
            self.ready.set()

    async def run(self, conn: SpdyConnection) -> None:
        request = self.request
        ready = asyncio.ensure_future(self.ready.wait())
        closed = asyncio.ensure_future(conn.closed.wait())
        try:
            await asyncio.wait({ready, closed}, timeout=STREAM_CREATION_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            closed.cancel()
        if not self.ready.is_set():
            log.warning("exec streams not created id=%s received=%s expected=%s",
                        request.container_id, sorted(self.streams), sorted(self.expected))
            return
        if self.protocol == PROTOCOL_V1:
            # v1 clients expect the server to close stdin and reset the error stream at once.
            conn.reset_stream(self.streams["error"])
        try:
            process = await ExecProcess.start(request, self.reaper)
        except (ServinError, OSError) as exc:
            log.info("exec failed to start id=%s: %s", request.container_id, exc)
            await self._finish(internal_error_status(str(exc)))
            return
        log.info("exec started id=%s pid=%d tty=%s", request.container_id, process.pid,
                 request.tty)
        try:
            code = await self._copy(process, conn)
        finally:
            process.close()
        log.info("exec finished id=%s pid=%d exit_code=%d", request.container_id, process.pid,
                 code)
        await self._finish(success_status() if code == 0 else
                           exit_code_status(code, request.cmd))

    async def _copy(self, process: ExecProcess, conn: SpdyConnection) -> int:
        exited = asyncio.Event()
        outputs = []
        for name, fd in (("stdout", process.stdout_fd), ("stderr", process.stderr_fd)):
            stream = self.streams.get(name)
            if fd is not None and stream is not None:
                linger = TTY_LINGER if process.master is not None else 0.0
                outputs.append(asyncio.ensure_future(_pump_output(fd, stream, exited, linger)))
        inputs = []
        if "stdin" in self.streams and process.stdin_fd is not None:
            inputs.append(asyncio.ensure_future(self._pump_input(process, self.streams["stdin"])))
        if "resize" in self.streams:
            inputs.append(asyncio.ensure_future(_read_resizes(process, self.streams["resize"])))
        closed = asyncio.ensure_future(conn.closed.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {process.exited, closed}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not process.exited.done():
                # The client no longer reads the output, as when kubectl exec is cut off, so the
                # process is killed, as containerd and CRI-O do, instead of lingering.
                log.info("exec client disconnected, killing the process id=%s pid=%d",
                         self.request.container_id, process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            code = await process.exited
            exited.set()
            # Output the process wrote before it exited is in the pipes: drain it, but do not
            # wait for background children that may keep the pipes open.
            await asyncio.gather(*outputs, return_exceptions=True)
        finally:
            closed.cancel()
            exited.set()
            for task in inputs + outputs:
                task.cancel()
            await asyncio.gather(*inputs, *outputs, return_exceptions=True)
        return code

    async def _pump_input(self, process: ExecProcess, stream: SpdyStream) -> None:
        while True:
            data = await stream.read()
            if not data:
                break
            if process.stdin_fd is None:
                continue
            try:
                await write_fd(process.stdin_fd, data)
            except (BrokenPipeError, OSError) as exc:
                log.debug("exec stdin closed id=%s: %s", self.request.container_id, exc)
                break
        # NOTE: a terminal's stdin stays open after the client's end of input, because the
        # process reads its end-of-file from the line discipline (^D), as with a real terminal.
        process.close_stdin()

    async def _finish(self, status: dict[str, Any]) -> None:
        for name in ("stdout", "stderr"):
            stream = self.streams.get(name)
            if stream is not None:
                stream.close()
        error = self.streams["error"]
        if self.protocol == PROTOCOL_V4:
            payload = json.dumps(status).encode()
        else:
            payload = b"" if status["status"] == "Success" else status["message"].encode()
        with contextlib.suppress(ConnectionError):
            if payload and not error.reset:
                await error.write(payload)
            error.close()
            await error.conn.drain()


async def _pump_output(fd: int, stream: SpdyStream, exited: asyncio.Event, linger: float) -> None:
    """Copy ``fd`` to ``stream`` until end of file, or until it is empty once ``exited`` is set.

    After the exit, reads wait up to ``linger`` seconds for more data: a pty passes output to
    the master asynchronously, so its last bytes can arrive after the process is gone.
    """
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    while True:
        data = read_fd(fd)
        if data is None:
            if exited.is_set():
                deadline = deadline or loop.time() + linger
                if loop.time() >= deadline:
                    return
            waiter = asyncio.ensure_future(wait_fd(fd))
            stopper = asyncio.ensure_future(
                asyncio.sleep(deadline - loop.time()) if deadline else exited.wait()
            )
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            continue
        if not data:
            return
        try:
            await stream.write(data)
        except ConnectionError:
            return


async def _read_resizes(process: ExecProcess, stream: SpdyStream) -> None:
    buffer = ""
    while True:
        data = await stream.read()
        if not data:
            return
        sizes, buffer = parse_resize(buffer + data.decode(errors="replace"))
        for width, height in sizes:
            process.resize(width, height)
