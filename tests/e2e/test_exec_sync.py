"""ExecSync on real runc: output, exit code, the container's process settings and timeouts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import Pod, container_config, run_container, wait_for_state
from tests.support.daemon import Daemon

MIB = 1024 * 1024


class ExecPod(Pod):
    """A pod with helpers to start a long-running container and exec into it."""

    async def sleeper(self, name: str = "sleeper", **options: object) -> str:
        config = container_config(self.image, name, command=["sleep", "3600"], **options)
        return await self.run_config(config, wait_running=True)

    async def exec(self, container_id: str, script: str, timeout: int = 10) -> cri.ExecSyncResponse:
        return await self.daemon.runtime.exec_sync(cri.ExecSyncRequest(
            container_id=container_id, cmd=["sh", "-c", script], timeout=timeout))


@pytest.fixture
async def pod(daemon: Daemon, busybox_ref: str) -> AsyncIterator[ExecPod]:
    yield await ExecPod.start(daemon, busybox_ref, "exec")


async def test_exec_returns_output_and_code(pod: ExecPod) -> None:
    container_id = await pod.sleeper()

    reply = await pod.exec(container_id, "echo out; echo err >&2; exit 3")

    assert reply.stdout == b"out\n"
    assert reply.stderr == b"err\n"
    assert reply.exit_code == 3


async def test_exec_signal_exit_code(pod: ExecPod) -> None:
    container_id = await pod.sleeper()

    reply = await pod.exec(container_id, "kill -9 $$")

    assert reply.exit_code == 128 + 9


async def test_exec_inherits_env_and_cwd(pod: ExecPod) -> None:
    container_id = await pod.sleeper(envs={"GREETING": "hello"}, working_dir="/tmp")

    reply = await pod.exec(container_id, 'echo "$GREETING"; pwd')

    assert reply.stdout == b"hello\n/tmp\n"


async def test_exec_inherits_user(pod: ExecPod) -> None:
    config = container_config(pod.image, "user", command=["sleep", "3600"])
    config.linux = cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
        run_as_user=cri.Int64Value(value=1234)))
    container_id = await pod.run_config(config, wait_running=True)

    reply = await pod.exec(container_id, "id -u")

    assert reply.stdout == b"1234\n"


async def test_exec_timeout_kills_command(pod: ExecPod) -> None:
    container_id = await pod.sleeper()
    started = time.monotonic()

    with pytest.raises(GRPCError) as caught:
        await pod.exec(container_id, "echo begun; sleep 31337", timeout=1)

    assert caught.value.status == Status.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    listing = await pod.exec(container_id, "cat /proc/[0-9]*/cmdline")
    assert b"31337" not in listing.stdout


async def test_exec_ignores_background_child(pod: ExecPod) -> None:
    container_id = await pod.sleeper()
    started = time.monotonic()

    # The background sleep inherits stdout, so the pipe stays open after the shell exits.
    reply = await pod.exec(container_id, "sleep 30 & echo done")

    assert reply.stdout == b"done\n"
    assert reply.exit_code == 0
    assert time.monotonic() - started < 5


async def test_exec_caps_output_at_16_mib(pod: ExecPod) -> None:
    container_id = await pod.sleeper()

    reply = await pod.exec(container_id, "head -c 20m /dev/zero; echo tail >&2", timeout=30)

    assert len(reply.stdout) == 16 * MIB
    assert reply.stderr == b"tail\n"
    assert reply.exit_code == 0


async def test_exec_missing_executable_fails(pod: ExecPod) -> None:
    container_id = await pod.sleeper()

    with pytest.raises(GRPCError) as caught:
        await pod.daemon.runtime.exec_sync(cri.ExecSyncRequest(
            container_id=container_id, cmd=["no-such-binary"], timeout=5))

    assert caught.value.status == Status.INTERNAL
    assert "no-such-binary" in (caught.value.message or "")


async def test_exec_unknown_container_not_found(pod: ExecPod) -> None:
    with pytest.raises(GRPCError) as caught:
        await pod.daemon.runtime.exec_sync(cri.ExecSyncRequest(
            container_id="0" * 64, cmd=["true"], timeout=5))

    assert caught.value.status == Status.NOT_FOUND


async def test_exec_exited_container_rejected(pod: ExecPod) -> None:
    config = container_config(pod.image, "done", command=["true"])
    container_id = await run_container(pod.daemon.runtime, pod.sandbox_id, pod.config, config)
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    with pytest.raises(GRPCError) as caught:
        await pod.exec(container_id, "true")

    assert caught.value.status == Status.FAILED_PRECONDITION


async def test_exec_empty_command_rejected(pod: ExecPod) -> None:
    container_id = await pod.sleeper()

    with pytest.raises(GRPCError) as caught:
        await pod.daemon.runtime.exec_sync(cri.ExecSyncRequest(container_id=container_id))

    assert caught.value.status == Status.INVALID_ARGUMENT
