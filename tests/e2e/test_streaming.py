"""Exec and PortForward through the daemon's streaming server, driven like kubectl over SPDY."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon
from tests.support.spdy_client import SpdyClient, forward_once, run_exec

POD_PORT = 8080


@dataclass
class Pod:
    daemon: Daemon
    image: str
    sandbox_id: str
    config: cri.PodSandboxConfig

    async def start(self, name: str, script: str) -> str:
        config = container_config(self.image, name, command=["sh", "-c", script])
        container_id = await run_container(self.daemon.runtime, self.sandbox_id, self.config,
                                           config)
        await wait_for_state(self.daemon.runtime, container_id,
                             cri.ContainerState.CONTAINER_RUNNING)
        return container_id

    async def exec_url(self, container_id: str, cmd: list[str], *, stdin: bool = False,
                       tty: bool = False) -> str:
        reply = await self.daemon.runtime.exec(cri.ExecRequest(
            container_id=container_id, cmd=cmd, stdin=stdin, stdout=True, stderr=not tty,
            tty=tty))
        return reply.url


@pytest.fixture
async def pod(daemon: Daemon, busybox_ref: str) -> AsyncIterator[Pod]:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    config = sandbox_config("stream", log_directory=daemon.logs)
    run = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    yield Pod(daemon, busybox_ref, run.pod_sandbox_id, config)


@pytest.fixture
async def sleeper(pod: Pod) -> str:
    return await pod.start("sleeper", "sleep 3600")


async def test_exec_url_is_loopback(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["true"])

    assert url.startswith("http://127.0.0.1:")
    assert "/exec/" in url


async def test_exec_echo(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["echo", "hello"])

    outcome = await run_exec(url)

    assert outcome.protocol == "v4.channel.k8s.io"
    assert outcome.stdout == b"hello\n"
    assert outcome.stderr == b""
    assert outcome.status["status"] == "Success"


async def test_exec_nonzero_exit(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["sh", "-c", "echo oops >&2; exit 3"])

    outcome = await run_exec(url)

    assert outcome.stderr == b"oops\n"
    assert outcome.status["reason"] == "NonZeroExitCode"
    assert outcome.status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


async def test_exec_stdin_cat(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["cat"], stdin=True)

    outcome = await run_exec(url, stdin=b"line one\nline two\n")

    assert outcome.stdout == b"line one\nline two\n"
    assert outcome.status["status"] == "Success"


async def test_exec_missing_binary(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["/no/such/binary"])

    outcome = await run_exec(url)

    assert outcome.status["reason"] == "InternalError"


async def test_exec_v2_plain_error(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["sh", "-c", "exit 4"])

    outcome = await run_exec(url, protocols=("v2.channel.k8s.io",))

    assert outcome.protocol == "v2.channel.k8s.io"
    assert b"non-zero exit code" in outcome.error


async def test_exec_tty(pod: Pod, sleeper: str) -> None:
    # The resize travels on its own stream, so the command gives it a moment to arrive.
    script = 'read line; echo "got:$line"; sleep 0.2; stty size; tty'
    url = await pod.exec_url(sleeper, ["sh", "-c", script], stdin=True, tty=True)

    outcome = await run_exec(url, stdin=b"hello\n", stderr=False, tty=True, resize=(100, 30))

    assert b"got:hello\r\n" in outcome.stdout
    assert b"30 100\r\n" in outcome.stdout
    assert b"/dev/pts/" in outcome.stdout
    assert outcome.status["status"] == "Success"


async def test_exec_token_single_use(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["true"])
    await run_exec(url)

    with pytest.raises(Exception, match="404"):
        await run_exec(url)


INVALID_EXECS = [
    ({"container_id": "", "cmd": ["true"], "stdout": True}, Status.INVALID_ARGUMENT),
    ({"container_id": "missing", "cmd": ["true"], "stdout": True}, Status.NOT_FOUND),
    ({"cmd": ["true"], "stdout": True, "stderr": True, "tty": True}, Status.INVALID_ARGUMENT),
    ({"cmd": ["true"]}, Status.INVALID_ARGUMENT),
    ({"cmd": [], "stdout": True}, Status.INVALID_ARGUMENT),
]


async def test_exec_rejects_invalid(pod: Pod, sleeper: str) -> None:
    # One pod serves the whole table, because starting a daemon and a pod dominates the time.
    for request_fields, status in INVALID_EXECS:
        fields = {"container_id": sleeper, **request_fields}

        with pytest.raises(GRPCError) as raised:
            await pod.daemon.runtime.exec(cri.ExecRequest(**fields))  # type: ignore[arg-type]

        assert raised.value.status == status, request_fields


async def test_exec_exited_container(pod: Pod) -> None:
    container_id = await pod.start("quick", "sleep 3600")
    await pod.daemon.runtime.stop_container(cri.StopContainerRequest(container_id=container_id,
                                                                     timeout=1))

    with pytest.raises(GRPCError) as raised:
        await pod.exec_url(container_id, ["true"])

    assert raised.value.status == Status.FAILED_PRECONDITION


async def test_attach_unimplemented(pod: Pod, sleeper: str) -> None:
    with pytest.raises(GRPCError) as raised:
        await pod.daemon.runtime.attach(cri.AttachRequest(container_id=sleeper, stdout=True))

    assert raised.value.status == Status.UNIMPLEMENTED


async def test_port_forward_needs_sandbox(pod: Pod) -> None:
    with pytest.raises(GRPCError) as raised:
        await pod.daemon.runtime.port_forward(cri.PortForwardRequest(pod_sandbox_id=""))

    assert raised.value.status == Status.INVALID_ARGUMENT


async def forward_http(pod: Pod, port: int) -> tuple[bytes, bytes]:
    reply = await pod.daemon.runtime.port_forward(
        cri.PortForwardRequest(pod_sandbox_id=pod.sandbox_id, port=[port]))
    client = await SpdyClient.connect(reply.url, ["portforward.k8s.io"])
    try:
        return await forward_once(client, port, 0, b"GET / HTTP/1.0\r\n\r\n")
    finally:
        await client.close()


async def test_port_forward_into_pod(pod: Pod) -> None:
    await pod.start("web", "mkdir -p /tmp/www && echo pod-page > /tmp/www/index.html && "
                           f"exec httpd -f -p 127.0.0.1:{POD_PORT} -h /tmp/www")
    # httpd listens shortly after the container starts.
    for _ in range(50):
        data, error = await forward_http(pod, POD_PORT)
        if not error:
            break
        await asyncio.sleep(0.1)

    assert error == b""
    assert data.startswith(b"HTTP/1.")
    assert data.endswith(b"pod-page\n")


async def test_port_forward_closed_port(pod: Pod) -> None:
    data, error = await forward_http(pod, 9)

    assert data == b""
    assert b"failed to connect to port 9" in error


async def test_exec_killed_when_client_disconnects(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["sh", "-c", "echo marker; exec sleep 777"])
    client = await SpdyClient.connect(url, ("v4.channel.k8s.io",))
    await client.open_stream({"streamType": "error"})
    stdout = await client.open_stream({"streamType": "stdout"})
    await client.open_stream({"streamType": "stderr"})
    await stdout.read_until(b"marker")

    await client.close()

    probe = ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]
    for _ in range(50):
        listed = await pod.daemon.runtime.exec_sync(cri.ExecSyncRequest(
            container_id=sleeper, cmd=probe, timeout=5))
        if b"sleep 777" not in listed.stdout:
            break
        await asyncio.sleep(0.1)
    assert b"sleep 777" not in listed.stdout
