"""StopContainer on real runc: stop signals, grace periods, concurrent stops and idempotence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import Pod, container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon
from tests.support.imagebuild import busybox_image, push_image
from tests.support.registry import Registry

#: Ignores SIGTERM and prints "ready" once the trap is in place.
STUBBORN = "trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done"


class StopPod(Pod):
    """A pod whose containers announce "ready" in their logs before a test stops them."""

    async def run_ready(self, name: str, script: str, image: str = "") -> str:
        config = container_config(image or self.image, name, command=["sh", "-c", script],
                                  log_path=f"{name}.log")
        container_id = await run_container(self.daemon.runtime, self.sandbox_id, self.config,
                                           config)
        await self.wait_for_output(name, b"ready")
        return container_id

    async def wait_for_output(self, name: str, text: bytes) -> None:
        path = self.daemon.logs / f"{name}.log"
        deadline = time.monotonic() + 10
        while not (path.exists() and text in path.read_bytes()):
            assert time.monotonic() < deadline, f"{name} never wrote {text!r}"
            await asyncio.sleep(0.02)

    async def stop(self, container_id: str, timeout: int) -> float:
        """Stop a container and return how long the call took, in seconds."""
        started = time.monotonic()
        await self.daemon.runtime.stop_container(
            cri.StopContainerRequest(container_id=container_id, timeout=timeout))
        return time.monotonic() - started

    async def status(self, container_id: str) -> cri.ContainerStatus:
        reply = await self.daemon.runtime.container_status(
            cri.ContainerStatusRequest(container_id=container_id))
        assert reply.status is not None
        return reply.status


@pytest.fixture
async def pod(daemon: Daemon, busybox_ref: str) -> AsyncIterator[StopPod]:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    config = sandbox_config("stop", log_directory=daemon.logs)
    run = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    yield StopPod(daemon, busybox_ref, run.pod_sandbox_id, config)


async def test_stop_timeout_zero_kills_at_once(pod: StopPod) -> None:
    container_id = await pod.run_ready(
        "instant", "trap 'echo got-term; exit 5' TERM; echo ready; while true; do sleep 0.1; done")

    elapsed = await pod.stop(container_id, 0)

    status = await pod.status(container_id)
    assert status.state == cri.ContainerState.CONTAINER_EXITED
    assert status.exit_code == 128 + 9
    assert elapsed < 2
    assert b"got-term" not in (pod.daemon.logs / "instant.log").read_bytes()


async def test_stop_kills_at_deadline(pod: StopPod) -> None:
    container_id = await pod.run_ready("stubborn", STUBBORN)

    elapsed = await pod.stop(container_id, 1)

    status = await pod.status(container_id)
    assert status.exit_code == 128 + 9
    assert elapsed >= 0.9
    assert elapsed < 5
    assert b"got-term" in (pod.daemon.logs / "stubborn.log").read_bytes()


async def test_stop_uses_image_stop_signal(pod: Pod, registry: Registry) -> None:
    image = push_image(registry.host, "test/busybox-usr1", "1",
                       busybox_image(stop_signal="SIGUSR1"))
    await pod.daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    script = "trap 'exit 7' USR1; trap 'exit 9' TERM; echo ready; while true; do sleep 0.1; done"
    container_id = await pod.run_ready("usr1", script, image=image)

    elapsed = await pod.stop(container_id, 10)

    status = await pod.status(container_id)
    assert status.exit_code == 7
    assert elapsed < 5


async def test_second_stop_keeps_grace_period(pod: StopPod) -> None:
    container_id = await pod.run_ready("graceful", STUBBORN)
    first = asyncio.create_task(pod.stop(container_id, 2))
    await pod.wait_for_output("graceful", b"got-term")

    # A shorter second stop must wait for the first stop's deadline, not kill earlier.
    second = await pod.stop(container_id, 0)
    first_elapsed = await first

    status = await pod.status(container_id)
    assert status.exit_code == 128 + 9
    assert second >= 1.2
    assert first_elapsed >= 1.9
    assert first_elapsed < 5
    log_text = (pod.daemon.logs / "graceful.log").read_bytes()
    assert log_text.count(b"got-term") == 1


async def test_stop_exited_container_succeeds(pod: StopPod) -> None:
    config = container_config(pod.image, "done", command=["true"])
    container_id = await run_container(pod.daemon.runtime, pod.sandbox_id, pod.config, config)
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    await pod.stop(container_id, 10)

    status = await pod.status(container_id)
    assert status.exit_code == 0
    assert status.reason == "Completed"


async def test_stop_unknown_container_succeeds(pod: StopPod) -> None:
    elapsed = await pod.stop("f" * 64, 10)

    assert elapsed < 2
