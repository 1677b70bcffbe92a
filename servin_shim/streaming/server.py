"""The streaming HTTP server: issues URLs for Exec, Attach and PortForward and serves them.

Routes are ``/exec/{token}``, ``/attach/{token}`` and ``/portforward/{token}`` for GET or
POST. A request must upgrade to SPDY/3.1 and name its sub-protocols in
``X-Stream-Protocol-Version``; the server picks the first one the client offers that it
supports. The HTTP part is small (one request per connection, then the upgrade), so it is
parsed here on asyncio streams instead of pulling in an HTTP library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from servin_shim.errors import Unimplemented
from servin_shim.oci.reaper import Reaper
from servin_shim.streaming import portforward, remotecommand
from servin_shim.streaming.requests import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    StreamingRequest,
)
from servin_shim.streaming.spdy import SpdyConnection
from servin_shim.streaming.tokens import RequestCache

log = logging.getLogger(__name__)

#: Largest request head (request line and headers) accepted, in bytes.
MAX_HEAD = 64 * 1024
#: Seconds a client has to send its request head after connecting.
HEAD_TIMEOUT = 30.0
#: Seconds an upgraded connection may stay open.
#: NOTE: kubelet's server uses 4 hours as an idle limit; here it bounds the whole session.
IDLE_TIMEOUT = 4 * 3600.0

ROUTES: dict[str, type] = {
    "exec": ExecRequest,
    "attach": AttachRequest,
    "portforward": PortForwardRequest,
}

REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           501: "Not Implemented"}


@dataclass
class HttpRequest:
    method: str
    path: str
    #: Header names lower-case; repeated headers keep every value in order.
    headers: dict[str, list[str]]

    def header(self, name: str) -> str:
        return ", ".join(self.headers.get(name.lower(), []))

    def tokens(self, name: str) -> list[str]:
        """Return the comma-separated values of a header, over all its occurrences."""
        values: list[str] = []
        for line in self.headers.get(name.lower(), []):
            values.extend(part.strip() for part in line.split(",") if part.strip())
        return values


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


async def read_request(reader: asyncio.StreamReader) -> HttpRequest:
    """Read and parse one request head; raises HttpError(400) on malformed input."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(400, f"request head larger than {MAX_HEAD} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"invalid request line {lines[0]!r}")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, f"invalid header line {line!r}")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return HttpRequest(method=parts[0], path=parts[1].split("?", 1)[0], headers=headers)


def negotiate(request: HttpRequest, supported: tuple[str, ...]) -> str:
    """Return the first protocol the client offers that is in ``supported``."""
    offered = request.tokens("X-Stream-Protocol-Version")
    if not offered:
        raise HttpError(400, "missing X-Stream-Protocol-Version header: name the stream "
                             f"protocols the client supports, for example {supported[0]}")
    for protocol in offered:
        if protocol in supported:
            return protocol
    raise HttpError(
        403, f"none of the stream protocols {', '.join(offered)} is supported: use one of "
             f"{', '.join(supported)}",
        {"X-Accepted-Stream-Protocol-Versions": ", ".join(supported)},
    )


def check_upgrade(request: HttpRequest) -> None:
    connection = [token.lower() for token in request.tokens("Connection")]
    upgrade = [token.lower() for token in request.tokens("Upgrade")]
    if "upgrade" not in connection:
        raise HttpError(400, "streaming requests must upgrade the connection: send "
                             "Connection: Upgrade and Upgrade: SPDY/3.1")
    if "spdy/3.1" not in upgrade:
        if "websocket" in upgrade:
            raise HttpError(501, "WebSocket streaming is not supported: use SPDY/3.1")
        raise HttpError(400, f"unsupported upgrade {request.header('Upgrade')!r}: "
                             "use SPDY/3.1")


async def write_response(writer: asyncio.StreamWriter, status: int, message: str,
                         headers: dict[str, str] | None = None) -> None:
    body = (message + "\n").encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
             "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}",
             "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


class StreamingServer:
    """The HTTP server behind the URLs that Exec, Attach and PortForward return."""

    def __init__(self, reaper: Reaper, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.reaper = reaper
        self.host = host
        self.port = port
        self.cache: RequestCache[StreamingRequest] = RequestCache()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port,
                                                  limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("streaming server listening url=%s", self.base_url)

    async def stop(self) -> None:
        """Stop accepting, then end every open session."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def url_for(self, request: StreamingRequest) -> str:
        """Store ``request`` and return the absolute URL a client connects to."""
        if self._server is None:
            raise Unimplemented("the streaming server is not running")
        route = next(name for name, kind in ROUTES.items() if isinstance(request, kind))
        token = self.cache.insert(request)
        return f"{self.base_url}/{route}/{token}"

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except HttpError as exc:
            log.info("streaming request rejected status=%d: %s", exc.status, exc)
            await write_response(writer, exc.status, str(exc), exc.headers)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.debug("streaming connection ended early: %r", exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("streaming connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await asyncio.wait_for(read_request(reader), HEAD_TIMEOUT)
        if request.method not in ("GET", "POST"):
            raise HttpError(405, f"method {request.method} is not allowed: use GET or POST")
        parts = request.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ROUTES:
            raise HttpError(404, f"no streaming route {request.path!r}")
        route, token = parts
        pending = self.cache.consume(token)
        if pending is None or not isinstance(pending, ROUTES[route]):
            raise HttpError(404, f"unknown or expired streaming token {token!r}: request a "
                                 "new URL")
        check_upgrade(request)
        supported: tuple[str, ...]
        if isinstance(pending, PortForwardRequest):
            supported = portforward.PROTOCOLS
        elif isinstance(pending, ExecRequest):
            supported = remotecommand.PROTOCOLS
        else:
            raise HttpError(501, "attach is not supported yet")
        protocol = negotiate(request, supported)
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                      f"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n")
                     .encode("latin-1"))
        await writer.drain()
        await asyncio.wait_for(self._run_session(pending, protocol, reader, writer),
                               IDLE_TIMEOUT)

    async def _run_session(self, pending: StreamingRequest, protocol: str,
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if isinstance(pending, ExecRequest):
            session = remotecommand.ExecSession(pending, protocol, self.reaper)
            conn = SpdyConnection(reader, writer, session.on_stream)
            frames = asyncio.ensure_future(conn.serve())
            try:
                await session.run(conn)
            finally:
                await conn.close()
                frames.cancel()
                await asyncio.gather(frames, return_exceptions=True)
            return
        assert isinstance(pending, PortForwardRequest)
        forward = portforward.PortForwardSession(pending)
        conn = SpdyConnection(reader, writer, forward.on_stream)
        frames = asyncio.ensure_future(conn.serve())
        try:
            await portforward.serve_port_forward(conn, forward)
        finally:
            await conn.close()
            frames.cancel()
            await asyncio.gather(frames, return_exceptions=True)
