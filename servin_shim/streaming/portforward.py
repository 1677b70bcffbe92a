"""Port forwarding over SPDY (portforward.k8s.io) into a pod's network namespace.

For each forwarded connection the client opens a pair of streams, ``error`` and ``data``, that
share a ``requestID`` header and name the pod port in a ``port`` header. The server connects to
127.0.0.1 (then ::1) at that port inside the pod's network namespace and copies bytes both
ways. A failure is written as text to the error stream and the pair is reset, so the client
reports it and may retry on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from servin_shim.streaming.requests import PortForwardRequest
from servin_shim.streaming.spdy import SpdyConnection, SpdyStream

log = logging.getLogger(__name__)

PROTOCOL_V1 = "portforward.k8s.io"
PROTOCOLS = (PROTOCOL_V1,)

CLONE_NEWNET = 0x40000000
#: Seconds to connect to the pod port before the attempt fails.
DIAL_TIMEOUT = 10.0
#: Seconds for the client to open the second stream of a pair.
PAIR_TIMEOUT = 30.0
READ_SIZE = 32 * 1024

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


def _dial_here(port: int) -> socket.socket:
    """Connect to ``port`` on loopback, IPv4 first, in the calling thread's namespace."""
    last: OSError | None = None
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(DIAL_TIMEOUT)
        try:
            sock.connect((address, port))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setblocking(False)
        return sock
    assert last is not None
    raise last


def dial_in_netns(netns_path: str, port: int) -> socket.socket:
    """Connect to ``port`` on loopback inside the network namespace at ``netns_path``.

    setns changes only the calling thread, so the work runs in a new thread that enters the
    pod's namespace, connects and goes back. The socket stays bound to the pod's namespace.
    An empty ``netns_path`` (a pod on the host network) dials in the daemon's own namespace.
    """
    result: list[socket.socket] = []
    errors: list[OSError] = []

    def work() -> None:
        try:
            if not netns_path:
                result.append(_dial_here(port))
                return
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(target)
                finally:
                    os.close(target)
                try:
                    result.append(_dial_here(port))
                finally:
                    # The thread ends right after this, so a failed switch back leaks nothing.
                    _setns(own)
            finally:
                os.close(own)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, name=f"portforward-dial-{port}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


@dataclass
class StreamPair:
    request_id: str
    port: int
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    expiry: asyncio.Task[None] | None = None


class PortForwardSession:
    """All forwarded connections of one SPDY connection to one pod."""

    def __init__(self, request: PortForwardRequest) -> None:
        self.request = request
        self.pairs: dict[str, StreamPair] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def on_stream(self, stream: SpdyStream) -> None:
        kind = stream.header("streamType")
        port_text = stream.header("port")
        try:
            port = int(port_text)
        except ValueError:
            port = 0
        if kind not in ("data", "error") or not 0 < port < 65536:
            log.warning("rejecting port-forward stream sandbox=%s stream_type=%r port=%r",
                        self.request.sandbox_id, kind, port_text)
            stream.reject()
            return

        # Clients older than requestID support are matched by stream id: error, then data.
        request_id = stream.header("requestID") or str(stream.id if kind == "error"
                                                       else stream.id - 2)
        pair = self.pairs.get(request_id)
        if pair is None:
            pair = self.pairs[request_id] = StreamPair(request_id, port)
            pair.expiry = self._spawn(self._expire(pair))
        if getattr(pair, kind) is not None:
            log.warning("rejecting duplicate port-forward stream sandbox=%s request_id=%s",
                        self.request.sandbox_id, request_id)
            stream.reject()
            return

        stream.accept()
        setattr(pair, kind, stream)
        if pair.data is not None and pair.error is not None:
            del self.pairs[request_id]
            if pair.expiry is not None:
                pair.expiry.cancel()
            self._spawn(self._forward(pair))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _expire(self, pair: StreamPair) -> None:
        await asyncio.sleep(PAIR_TIMEOUT)
        if self.pairs.get(pair.request_id) is pair:
            del self.pairs[pair.request_id]
            log.warning("port-forward stream pair incomplete after %.0fs sandbox=%s "
                        "request_id=%s", PAIR_TIMEOUT, self.request.sandbox_id, pair.request_id)
            for stream in (pair.data, pair.error):
                if stream is not None:
                    stream.reject()

    async def _forward(self, pair: StreamPair) -> None:
        assert pair.data is not None and pair.error is not None
        conn = pair.data.conn
        try:
            await self._copy(pair)
        finally:
            # A long port-forward session carries many pairs, so forget the finished ones.
            conn.streams.pop(pair.data.id, None)
            conn.streams.pop(pair.error.id, None)

    async def _copy(self, pair: StreamPair) -> None:
        assert pair.data is not None and pair.error is not None
        conn = pair.data.conn
        try:
            sock = await asyncio.to_thread(dial_in_netns, self.request.netns_path, pair.port)
        except OSError as exc:
            message = (f"failed to connect to port {pair.port} in pod sandbox "
                       f"{self.request.sandbox_id}: {exc.strerror or exc}")
            log.info("port-forward failed sandbox=%s port=%d: %s", self.request.sandbox_id,
                     pair.port, exc)
            with contextlib.suppress(ConnectionError):
                await pair.error.write(message.encode())
            pair.error.close()
            conn.reset_stream(pair.data)
            return
        log.debug("port-forward connected sandbox=%s port=%d request_id=%s",
                  self.request.sandbox_id, pair.port, pair.request_id)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            results = await asyncio.gather(_to_socket(pair.data, writer),
                                           _from_socket(reader, pair.data),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.info("port-forward copy failed sandbox=%s port=%d: %s",
                             self.request.sandbox_id, pair.port, result)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            pair.data.close()
            pair.error.close()
            with contextlib.suppress(ConnectionError):
                await conn.drain()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _to_socket(stream: SpdyStream, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await stream.read()
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise


async def _from_socket(reader: asyncio.StreamReader, stream: SpdyStream) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            await stream.write(data)
    stream.close()


async def serve_port_forward(conn: SpdyConnection, session: PortForwardSession) -> None:
    """Serve forwarded connections until the client closes the SPDY connection."""
    try:
        await conn.closed.wait()
    finally:
        await session.close()
