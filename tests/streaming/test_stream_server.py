"""The streaming HTTP server: routing, the SPDY upgrade, and port forwarding on loopback.

Port forwarding reaches an echo server of the test on 127.0.0.1 through a request without a
network namespace, as for a host-network pod. The e2e tests cover a pod's own namespace.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servin_shim.oci.reaper import Reaper
from servin_shim.oci.runtime import OCIRuntime
from servin_shim.streaming import ExecRequest, PortForwardRequest, StreamingServer
from tests.support.spdy_client import (
    SpdyClient,
    UpgradeRejected,
    forward_once,
    http_request,
    upgrade_headers,
)

FORWARD = PortForwardRequest(sandbox_id="pod1", netns_path="")


@pytest.fixture
async def server() -> AsyncIterator[StreamingServer]:
    streaming = StreamingServer(Reaper())
    await streaming.start()
    try:
        yield streaming
    finally:
        await streaming.stop()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield echo_server.sockets[0].getsockname()[1]
    finally:
        echo_server.close()
        await echo_server.wait_closed()


def exec_request(tmp_path: Path) -> ExecRequest:
    runtime = OCIRuntime(Reaper(), name="runc", binary="runc", root=tmp_path)
    return ExecRequest(container_id="c1", cmd=("true",), tty=False, stdin=False, stdout=True,
                       stderr=True, runtime=runtime, work_dir=tmp_path, socket_dir=tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_url_format(server: StreamingServer) -> None:
    url = server.url_for(FORWARD)

    assert re.fullmatch(rf"http://127\.0\.0\.1:{server.port}/portforward/[\w-]{{8}}", url)


async def test_unknown_token_404(server: StreamingServer) -> None:
    reply, _, _ = await http_request(f"{server.base_url}/exec/AAAAAAAA",
                                     upgrade_headers(["v4.channel.k8s.io"]))

    assert reply.status == 404


async def test_unknown_route_404(server: StreamingServer) -> None:
    reply, _, _ = await http_request(f"{server.base_url}/logs/AAAAAAAA", {})

    assert reply.status == 404


async def test_token_single_use(server: StreamingServer) -> None:
    url = server.url_for(FORWARD)
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    await client.close()

    with pytest.raises(UpgradeRejected) as rejected:
        await SpdyClient.connect(url, ["portforward.k8s.io"])

    assert rejected.value.reply.status == 404


async def test_token_other_route_404(server: StreamingServer, tmp_path: Path) -> None:
    url = server.url_for(exec_request(tmp_path)).replace("/exec/", "/portforward/")

    with pytest.raises(UpgradeRejected) as rejected:
        await SpdyClient.connect(url, ["portforward.k8s.io"])

    assert rejected.value.reply.status == 404


async def test_missing_upgrade_400(server: StreamingServer) -> None:
    reply, _, _ = await http_request(server.url_for(FORWARD),
                                     {"X-Stream-Protocol-Version": "portforward.k8s.io"})

    assert reply.status == 400


async def test_websocket_upgrade_501(server: StreamingServer) -> None:
    headers = {"Connection": "Upgrade", "Upgrade": "websocket",
               "X-Stream-Protocol-Version": "portforward.k8s.io"}

    reply, _, _ = await http_request(server.url_for(FORWARD), headers)

    assert reply.status == 501


async def test_missing_protocol_400(server: StreamingServer) -> None:
    headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}

    reply, _, _ = await http_request(server.url_for(FORWARD), headers)

    assert reply.status == 400


async def test_unsupported_protocol_403(server: StreamingServer, tmp_path: Path) -> None:
    with pytest.raises(UpgradeRejected) as rejected:
        await SpdyClient.connect(server.url_for(exec_request(tmp_path)), ["v9.channel.k8s.io"])

    reply = rejected.value.reply
    assert reply.status == 403
    assert reply.headers["x-accepted-stream-protocol-versions"].startswith("v4.channel.k8s.io")


async def test_exec_picks_first_offered(server: StreamingServer, tmp_path: Path) -> None:
    client = await SpdyClient.connect(server.url_for(exec_request(tmp_path)),
                                      ["v5.channel.k8s.io", "v3.channel.k8s.io",
                                       "v4.channel.k8s.io"])
    await client.close()

    assert client.protocol == "v3.channel.k8s.io"


async def test_exec_rejects_unknown_stream(server: StreamingServer, tmp_path: Path) -> None:
    client = await SpdyClient.connect(server.url_for(exec_request(tmp_path)),
                                      ["v4.channel.k8s.io"])
    try:
        with pytest.raises(ConnectionResetError):
            await client.open_stream({"streamType": "stdin"})
    finally:
        await client.close()


async def test_ping_echoed(server: StreamingServer) -> None:
    client = await SpdyClient.connect(server.url_for(FORWARD), ["portforward.k8s.io"])
    try:
        client.ping(7)
        for _ in range(100):
            if client.pings:
                break
            await asyncio.sleep(0.01)
    finally:
        await client.close()

    assert client.pings == [7]


async def test_forward_roundtrip(server: StreamingServer, echo_port: int) -> None:
    client = await SpdyClient.connect(server.url_for(FORWARD), ["portforward.k8s.io"])
    try:
        data, error = await forward_once(client, echo_port, 0, b"ping")
    finally:
        await client.close()

    assert data == b"echo:ping"
    assert error == b""


async def test_forward_pairs_share_connection(server: StreamingServer, echo_port: int) -> None:
    client = await SpdyClient.connect(server.url_for(FORWARD), ["portforward.k8s.io"])
    try:
        first = await forward_once(client, echo_port, 0, b"one")
        second = await forward_once(client, echo_port, 1, b"two")
    finally:
        await client.close()

    assert first[0] == b"echo:one"
    assert second[0] == b"echo:two"


async def test_forward_large_payload(server: StreamingServer, echo_port: int) -> None:
    payload = bytes(range(256)) * 4096
    client = await SpdyClient.connect(server.url_for(FORWARD), ["portforward.k8s.io"])
    try:
        data, _ = await forward_once(client, echo_port, 0, payload)
    finally:
        await client.close()

    assert data == b"echo:" + payload


async def test_forward_refused_port(server: StreamingServer) -> None:
    port = free_port()
    client = await SpdyClient.connect(server.url_for(FORWARD), ["portforward.k8s.io"])
    try:
        data, error = await forward_once(client, port, 0, b"")
        reset = client.streams[3].reset
    finally:
        await client.close()

    assert data == b""
    assert f"failed to connect to port {port}".encode() in error
    assert reset


async def test_forward_invalid_port_rejected(server: StreamingServer) -> None:
    client = await SpdyClient.connect(server.url_for(FORWARD), ["portforward.k8s.io"])
    try:
        with pytest.raises(ConnectionResetError):
            await client.open_stream({"port": "70000", "streamType": "data", "requestID": "0"})
    finally:
        await client.close()


async def test_forward_missing_stream_type(server: StreamingServer) -> None:
    client = await SpdyClient.connect(server.url_for(FORWARD), ["portforward.k8s.io"])
    try:
        with pytest.raises(ConnectionResetError):
            await client.open_stream({"port": "80", "requestID": "0"})
    finally:
        await client.close()
