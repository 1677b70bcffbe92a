"""A small SPDY/3.1 client for tests: the upgrade, streams, and remotecommand/portforward helpers.

It plays the part of client-go: it opens the streams in the order kubectl does and waits for a
SYN_REPLY after each one. Frames are encoded here on their own, so that a framing bug of the
server is not mirrored by the client. Only the SPDY/3 header dictionary, which is protocol
data, comes from the server package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from servin_shim.streaming.spdy import HEADER_DICTIONARY

REMOTECOMMAND_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io",
                           "v2.channel.k8s.io", "channel.k8s.io")
STEP_TIMEOUT = 10.0


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


class UpgradeRejected(Exception):
    def __init__(self, reply: HttpReply) -> None:
        super().__init__(f"upgrade rejected with {reply.status}: {reply.body!r}")
        self.reply = reply


async def _read_reply_head(reader: asyncio.StreamReader) -> HttpReply:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return HttpReply(status, headers, b"")


async def http_request(url: str, headers: dict[str, str], method: str = "GET") -> tuple[
        HttpReply, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send one request and read the reply head; a non-101 reply's body is read too."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"{method} {parts.path} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    reply = await asyncio.wait_for(_read_reply_head(reader), STEP_TIMEOUT)
    if reply.status != 101:
        reply.body = await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return reply, reader, writer


def upgrade_headers(protocols: tuple[str, ...] | list[str]) -> dict[str, str]:
    return {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
            "X-Stream-Protocol-Version": ", ".join(protocols)}


@dataclass
class ClientStream:
    client: SpdyClient
    id: int
    replied: asyncio.Event = field(default_factory=asyncio.Event)
    data: bytearray = field(default_factory=bytearray)
    fin: asyncio.Event = field(default_factory=asyncio.Event)
    reset: bool = False
    chunk: asyncio.Event = field(default_factory=asyncio.Event)

    async def write(self, data: bytes) -> None:
        self.client._send(struct.pack(">II", self.id, len(data)) + data)
        await self.client.writer.drain()

    async def close(self) -> None:
        self.client._send(struct.pack(">II", self.id, 1 << 24))
        await self.client.writer.drain()

    async def read_all(self, timeout: float = STEP_TIMEOUT) -> bytes:
        """Wait for FIN or reset and return everything the stream carried."""
        await asyncio.wait_for(self.fin.wait(), timeout)
        return bytes(self.data)

    async def read_until(self, needle: bytes, timeout: float = STEP_TIMEOUT) -> bytes:
        async def wait() -> None:
            while needle not in self.data:
                if self.fin.is_set():
                    raise AssertionError(f"stream ended without {needle!r}: {bytes(self.data)!r}")
                self.chunk.clear()
                await self.chunk.wait()

        await asyncio.wait_for(wait(), timeout)
        return bytes(self.data)


class SpdyClient:
    """The client end of one SPDY/3.1 connection after a successful upgrade."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: str) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.compressor = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY,
                                           HEADER_DICTIONARY)
        self.decompressor = zlib.decompressobj(zdict=HEADER_DICTIONARY)
        self.streams: dict[int, ClientStream] = {}
        self.next_id = 1
        self.goaway = asyncio.Event()
        self.pings: list[int] = []
        self._loop_task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, url: str, protocols: tuple[str, ...] | list[str]) -> SpdyClient:
        reply, reader, writer = await http_request(url, upgrade_headers(protocols))
        if reply.status != 101:
            raise UpgradeRejected(reply)
        return cls(reader, writer, reply.headers.get("x-stream-protocol-version", ""))

    def _send(self, frame: bytes) -> None:
        self.writer.write(frame)

    def _control(self, frame_type: int, flags: int, payload: bytes) -> None:
        self._send(struct.pack(">HHI", 0x8003, frame_type, (flags << 24) | len(payload)) + payload)

    def _header_block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for name, value in headers.items():
            raw += struct.pack(">I", len(name)) + name.lower().encode()
            raw += struct.pack(">I", len(value)) + value.encode()
        return self.compressor.compress(raw) + self.compressor.flush(zlib.Z_SYNC_FLUSH)

    async def open_stream(self, headers: dict[str, str]) -> ClientStream:
        """Send SYN_STREAM and wait for the server's SYN_REPLY (raises if it resets instead)."""
        stream = ClientStream(self, self.next_id)
        self.streams[stream.id] = stream
        self.next_id += 2
        payload = struct.pack(">IIBB", stream.id, 0, 0, 0) + self._header_block(headers)
        self._control(1, 0, payload)
        await self.writer.drain()
        await asyncio.wait_for(stream.replied.wait(), STEP_TIMEOUT)
        if stream.reset:
            raise ConnectionResetError(f"server reset stream {stream.id} ({headers})")
        return stream

    def ping(self, ping_id: int) -> None:
        self._control(6, 0, struct.pack(">I", ping_id))

    async def _read_loop(self) -> None:
        try:
            while True:
                first, second = struct.unpack(">II", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(second & 0xFFFFFF)
                flags = second >> 24
                if first & 0x80000000:
                    self._on_control(first & 0xFFFF, payload)
                    continue
                stream = self.streams.get(first)
                if stream is None:
                    continue
                stream.data += payload
                stream.chunk.set()
                if flags & 1:
                    stream.fin.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.goaway.set()
            for stream in self.streams.values():
                stream.replied.set()
                stream.fin.set()
                stream.chunk.set()

    def _on_control(self, frame_type: int, payload: bytes) -> None:
        if frame_type == 2:  # SYN_REPLY
            (stream_id,) = struct.unpack_from(">I", payload)
            self.decompressor.decompress(payload[4:])
            self.streams[stream_id].replied.set()
        elif frame_type == 3:  # RST_STREAM
            (stream_id,) = struct.unpack_from(">I", payload)
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.reset = True
                stream.replied.set()
                stream.fin.set()
                stream.chunk.set()
        elif frame_type == 6:  # PING
            self.pings.append(struct.unpack(">I", payload)[0])
        elif frame_type == 7:  # GOAWAY
            self.goaway.set()

    async def close(self) -> None:
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclass
class ExecOutcome:
    protocol: str
    stdout: bytes
    stderr: bytes
    error: bytes

    @property
    def status(self) -> dict[str, Any]:
        return json.loads(self.error)


async def run_exec(url: str, *, stdin: bytes | None = None, stdout: bool = True,
                   stderr: bool = True, tty: bool = False,
                   protocols: tuple[str, ...] = REMOTECOMMAND_PROTOCOLS,
                   resize: tuple[int, int] | None = None, timeout: float = STEP_TIMEOUT,
                   ) -> ExecOutcome:
    """Run one exec session as kubectl does and collect its output and status."""
    client = await SpdyClient.connect(url, protocols)
    try:
        error = await client.open_stream({"streamType": "error"})
        streams: dict[str, ClientStream] = {}
        if stdin is not None:
            streams["stdin"] = await client.open_stream({"streamType": "stdin"})
        if stdout:
            streams["stdout"] = await client.open_stream({"streamType": "stdout"})
        if stderr:
            streams["stderr"] = await client.open_stream({"streamType": "stderr"})
        if tty and client.protocol not in ("channel.k8s.io", "v2.channel.k8s.io"):
            streams["resize"] = await client.open_stream({"streamType": "resize"})
            if resize is not None:
                width, height = resize
                await streams["resize"].write(
                    json.dumps({"Width": width, "Height": height}).encode())
        if stdin is not None:
            if stdin:
                await streams["stdin"].write(stdin)
            if not tty:
                await streams["stdin"].close()
        status = await error.read_all(timeout)
        out = await streams["stdout"].read_all(timeout) if stdout else b""
        err = await streams["stderr"].read_all(timeout) if stderr else b""
        return ExecOutcome(client.protocol, out, err, status)
    finally:
        await client.close()


async def forward_once(client: SpdyClient, port: int, request_id: int, payload: bytes,
                       timeout: float = STEP_TIMEOUT) -> tuple[bytes, bytes]:
    """Open one error+data pair, send ``payload`` and half-close; return (data, error)."""
    headers = {"port": str(port), "requestID": str(request_id)}
    error = await client.open_stream({**headers, "streamType": "error"})
    data = await client.open_stream({**headers, "streamType": "data"})
    if payload:
        await data.write(payload)
    await data.close()
    received = await data.read_all(timeout)
    message = await error.read_all(timeout)
    return received, message
