"""SPDY/3 framing: the header dictionary, header blocks, zlib contexts and frame layout."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest

from servin_shim.streaming import spdy


def test_dictionary_size_and_id() -> None:
    # The SPDY/3 draft gives the dictionary as 1423 bytes; zlib names it by its Adler-32.
    assert len(spdy.HEADER_DICTIONARY) == 1423
    assert zlib.adler32(spdy.HEADER_DICTIONARY) == 0xE3C6A7C2


def test_dictionary_starts_with_options() -> None:
    assert spdy.HEADER_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")


def test_dictionary_ends_with_tail() -> None:
    assert spdy.HEADER_DICTIONARY.endswith(b"utf-,*,enq=0.")


def test_header_block_roundtrip() -> None:
    block = spdy.encode_header_block({"streamType": ["stdout"], "X": ["a", "b"]})

    headers = spdy.decode_header_block(block)

    assert headers == {"streamtype": ["stdout"], "x": ["a", "b"]}


def test_header_block_layout() -> None:
    block = spdy.encode_header_block({"port": ["80"]})

    assert block == struct.pack(">I", 1) + b"\x00\x00\x00\x04port" + b"\x00\x00\x00\x0280"


def test_header_block_trailing_bytes() -> None:
    block = spdy.encode_header_block({"a": ["b"]}) + b"x"

    with pytest.raises(spdy.SpdyProtocolError):
        spdy.decode_header_block(block)


def test_header_block_truncated() -> None:
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.decode_header_block(b"\x00\x00\x00\x02\x00\x00")


def test_compression_context_shared() -> None:
    compressor = spdy.HeaderCompressor()
    decompressor = spdy.HeaderDecompressor()
    first = compressor.compress({"streamtype": ["error"]})
    second = compressor.compress({"streamtype": ["stdout"]})

    assert decompressor.decompress(first) == {"streamtype": ["error"]}
    assert decompressor.decompress(second) == {"streamtype": ["stdout"]}


def test_compression_uses_dictionary() -> None:
    block = spdy.HeaderCompressor().compress({})

    # A zlib header with FDICT set is followed by the dictionary's Adler-32.
    assert block[1] & 0x20
    assert block[2:6] == struct.pack(">I", 0xE3C6A7C2)


def test_decompress_other_dictionary_rejected() -> None:
    other = zlib.compressobj(zdict=b"another dictionary")
    plain = other.compress(spdy.encode_header_block({})) + other.flush(zlib.Z_SYNC_FLUSH)

    with pytest.raises(spdy.SpdyProtocolError):
        spdy.HeaderDecompressor().decompress(plain)


def test_control_frame_layout() -> None:
    frame = spdy.control_frame(spdy.RST_STREAM, 0, struct.pack(">II", 3, spdy.CANCEL))

    assert frame[:8] == bytes.fromhex("8003000300000008")
    assert frame[8:] == bytes.fromhex("0000000300000005")


def test_data_frame_fin_flag() -> None:
    frame = spdy.data_frame(5, spdy.FLAG_FIN, b"hi")

    assert frame == bytes.fromhex("00000005" "01000002") + b"hi"


async def test_read_frame_data() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(spdy.data_frame(7, spdy.FLAG_FIN, b"abc"))

    frame = await spdy.read_frame(reader)

    assert (frame.control, frame.stream_id, frame.flags, frame.payload) == (
        False, 7, spdy.FLAG_FIN, b"abc")


async def test_read_frame_control() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(spdy.control_frame(spdy.PING, 0, b"\x00\x00\x00\x01"))

    frame = await spdy.read_frame(reader)

    assert (frame.control, frame.frame_type, frame.payload) == (True, spdy.PING, b"\x00\x00\x00\x01")


async def test_read_frame_wrong_version() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">HHI", 0x8002, spdy.PING, 4) + b"\x00\x00\x00\x01")

    with pytest.raises(spdy.SpdyProtocolError):
        await spdy.read_frame(reader)
