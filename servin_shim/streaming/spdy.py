"""SPDY/3 framing and a server-side SPDY/3.1 connection on asyncio streams.

kubelet (through client-go and moby/spdystream) speaks SPDY/3 after an HTTP ``101 Switching
Protocols`` with ``Upgrade: SPDY/3.1``. Only what those clients use is implemented: streams opened
by the client, DATA with FIN, RST_STREAM, PING echo, GOAWAY, and header blocks compressed with
zlib and the SPDY/3 dictionary. spdystream never sends WINDOW_UPDATE, so there is no per-stream
flow control: back-pressure comes only from the TCP connection (``StreamWriter.drain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01

#: RST_STREAM status codes (SPDY/3 draft, section 2.6.3).
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6

#: The largest DATA payload: the frame length field has 24 bits.
MAX_DATA_LENGTH = (1 << 24) - 1
#: Largest chunk this side writes in one DATA frame.
WRITE_CHUNK = 32 * 1024
#: Largest decompressed header block accepted from a client.
MAX_HEADER_BLOCK = 1 << 20

# The SPDY/3 header compression dictionary (SPDY/3 draft, section 2.6.10.1): these names, each
# behind its length as a 32-bit big-endian integer, followed by one run of common values.
_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type", "date",
    "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK", "version",
    "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = (
    b"".join(struct.pack(">I", len(word)) + word.encode() for word in _DICTIONARY_WORDS)
    + _DICTIONARY_TAIL.encode()
)

Headers = dict[str, list[str]]


class SpdyProtocolError(Exception):
    """The peer sent bytes that are not valid SPDY/3."""


class HeaderCompressor:
    """One direction's zlib context; SPDY/3 shares it across every header block of a session."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY,
                                      HEADER_DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        return self._zlib.compress(encode_header_block(headers)) + self._zlib.flush(
            zlib.Z_SYNC_FLUSH
        )


class HeaderDecompressor:
    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(zdict=HEADER_DICTIONARY)

    def decompress(self, data: bytes) -> Headers:
        try:
            block = self._zlib.decompress(data, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SpdyProtocolError(f"invalid compressed header block: {exc}") from None
        if self._zlib.unconsumed_tail:
            raise SpdyProtocolError(f"header block larger than {MAX_HEADER_BLOCK} bytes")
        return decode_header_block(block)


def encode_header_block(headers: Headers) -> bytes:
    """Encode name/value pairs; names go lower-case and several values join with NUL."""
    out = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        raw_name = name.lower().encode()
        raw_value = "\x00".join(values).encode()
        out.append(struct.pack(">I", len(raw_name)) + raw_name)
        out.append(struct.pack(">I", len(raw_value)) + raw_value)
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    """Decode an uncompressed header block; names are returned lower-case."""
    try:
        (count,) = struct.unpack_from(">I", block, 0)
        offset = 4
        headers: Headers = {}
        for _ in range(count):
            (size,) = struct.unpack_from(">I", block, offset)
            name = block[offset + 4: offset + 4 + size].decode().lower()
            offset += 4 + size
            (size,) = struct.unpack_from(">I", block, offset)
            value = block[offset + 4: offset + 4 + size].decode()
            offset += 4 + size
            headers.setdefault(name, []).extend(value.split("\x00"))
    except (struct.error, UnicodeDecodeError) as exc:
        raise SpdyProtocolError(f"malformed header block: {exc}") from None
    if offset != len(block):
        raise SpdyProtocolError(f"header block has {len(block) - offset} trailing bytes")
    return headers


def control_frame(frame_type: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(payload)) + payload


@dataclass
class Frame:
    """One decoded frame, a control frame (with ``frame_type``) or DATA (with ``stream_id``)."""

    control: bool
    flags: int
    payload: bytes
    frame_type: int = 0
    stream_id: int = 0


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame; raises IncompleteReadError at end of stream."""
    head = await reader.readexactly(8)
    first, second = struct.unpack(">II", head)
    flags = second >> 24
    length = second & 0xFFFFFF
    payload = await reader.readexactly(length)
    if first & 0x80000000:
        version = (first >> 16) & 0x7FFF
        if version != VERSION:
            raise SpdyProtocolError(f"unsupported SPDY version {version}, expected {VERSION}")
        return Frame(control=True, flags=flags, payload=payload, frame_type=first & 0xFFFF)
    return Frame(control=False, flags=flags, payload=payload, stream_id=first & 0x7FFFFFFF)


@dataclass
class SpdyStream:
    """One SPDY stream opened by the client; this side replies, writes, half-closes or resets."""

    conn: SpdyConnection
    id: int
    headers: Headers
    remote_fin: bool = False
    local_fin: bool = False
    reset: bool = False
    _chunks: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    def header(self, name: str) -> str:
        """Return the first value of a header (names compare case-insensitively) or ""."""
        values = self.headers.get(name.lower()) or [""]
        return values[0]

    def accept(self) -> None:
        """Send SYN_REPLY with no headers, the acceptance spdystream clients wait for."""
        self.conn.send_control(SYN_REPLY, 0, struct.pack(">I", self.id)
                               + self.conn.compressor.compress({}))

    def reject(self, status: int = REFUSED_STREAM) -> None:
        self.conn.reset_stream(self, status)

    async def read(self) -> bytes:
        """Return the next chunk of data, or b"" once the client finished or reset the stream."""
        if self.reset or (self.remote_fin and self._chunks.empty()):
            return b""
        return await self._chunks.get()

    async def write(self, data: bytes) -> None:
        if self.local_fin or self.reset:
            raise ConnectionResetError(f"spdy stream {self.id} is closed for writing")
        for start in range(0, len(data), WRITE_CHUNK):
            self.conn.send(data_frame(self.id, 0, data[start: start + WRITE_CHUNK]))
        await self.conn.drain()

    def close(self) -> None:
        """Half-close: send an empty DATA frame with FIN."""
        if self.local_fin or self.reset:
            return
        self.local_fin = True
        self.conn.send(data_frame(self.id, FLAG_FIN, b""))

    def _feed(self, data: bytes, fin: bool) -> None:
        if data:
            self._chunks.put_nowait(data)
        if fin:
            self.remote_fin = True
            self._chunks.put_nowait(b"")

    def _on_reset(self) -> None:
        self.reset = True
        self._chunks.put_nowait(b"")


StreamHandler = Callable[[SpdyStream], None]


class SpdyConnection:
    """The server side of one SPDY/3.1 session on an upgraded HTTP connection.

    ``on_stream`` runs in the frame loop for every SYN_STREAM from the client. It must call
    ``accept`` or ``reject`` on the stream, and hand slow work to a task.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_stream: StreamHandler,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_stream = on_stream
        self.compressor = HeaderCompressor()
        self.decompressor = HeaderDecompressor()
        self.streams: dict[int, SpdyStream] = {}
        self.last_stream_id = 0
        self.closed = asyncio.Event()
        self._goaway_sent = False

    def send(self, frame: bytes) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(frame)

    def send_control(self, frame_type: int, flags: int, payload: bytes) -> None:
        self.send(control_frame(frame_type, flags, payload))

    async def drain(self) -> None:
        await self.writer.drain()

    def reset_stream(self, stream: SpdyStream, status: int = CANCEL) -> None:
        if stream.reset:
            return
        stream._on_reset()
        self.send_control(RST_STREAM, 0, struct.pack(">II", stream.id, status))

    async def serve(self) -> None:
        """Read frames until the client closes or sends GOAWAY, or ``close`` is called."""
        try:
            while not self.closed.is_set():
                frame = await read_frame(self.reader)
                if frame.control:
                    self._on_control(frame)
                else:
                    self._on_data(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.debug("spdy connection closed by the client")
        except SpdyProtocolError as exc:
            log.warning("closing spdy connection after a protocol error: %s", exc)
            self._goaway(1)
        finally:
            for stream in self.streams.values():
                if not stream.reset:
                    stream._on_reset()
            self.closed.set()

    def _on_control(self, frame: Frame) -> None:
        payload = frame.payload
        if frame.frame_type == SYN_STREAM:
            if len(payload) < 10:
                raise SpdyProtocolError("SYN_STREAM shorter than 10 bytes")
            stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            headers = self.decompressor.decompress(payload[10:])
            self._on_syn_stream(stream_id, headers, frame.flags)
        elif frame.frame_type in (SYN_REPLY, HEADERS):
            # Decompress even ignored header blocks so the shared zlib context stays in step.
            self.decompressor.decompress(payload[4:])
        elif frame.frame_type == RST_STREAM:
            stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            stream = self.streams.get(stream_id)
            if stream is not None and not stream.reset:
                stream._on_reset()
        elif frame.frame_type == PING:
            self.send_control(PING, 0, payload)
        elif frame.frame_type == GOAWAY:
            self.closed.set()

    def _on_syn_stream(self, stream_id: int, headers: Headers, flags: int) -> None:
        if stream_id == 0 or stream_id % 2 == 0 or stream_id <= self.last_stream_id:
            # Clients open odd ids in increasing order (SPDY/3 draft, section 2.3.2).
            self.send_control(RST_STREAM, 0, struct.pack(">II", stream_id, PROTOCOL_ERROR))
            return
        self.last_stream_id = stream_id
        stream = SpdyStream(self, stream_id, headers)
        self.streams[stream_id] = stream
        if flags & FLAG_FIN:
            stream._feed(b"", True)
        self.on_stream(stream)

    def _on_data(self, frame: Frame) -> None:
        stream = self.streams.get(frame.stream_id)
        if stream is None or stream.reset:
            return
        if stream.remote_fin:
            self.send_control(RST_STREAM, 0, struct.pack(">II", stream.id, INVALID_STREAM))
            return
        stream._feed(frame.payload, bool(frame.flags & FLAG_FIN))

    def _goaway(self, status: int = 0) -> None:
        if not self._goaway_sent:
            self._goaway_sent = True
            self.send_control(GOAWAY, 0, struct.pack(">II", self.last_stream_id, status))

    async def close(self) -> None:
        """Send GOAWAY, flush and close the TCP connection."""
        self._goaway()
        self.closed.set()
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

