"""UpdateContainerResources and OOM exit reasons on real runc and this host's cgroups."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from servin_shim.oci import cgroups
from tests.e2e.helpers import Pod, container_config, run_container, wait_for_state
from tests.support.daemon import Daemon

MIB = 1024 * 1024


class ResourcePod(Pod):
    """A pod with helpers to update and inspect a container's resources."""

    async def run(self, name: str, script: str, *, wait_running: bool = True) -> str:
        """Run ``sh -c script`` and wait until it runs, so its cgroup exists."""
        return await super().run(name, script, wait_running=wait_running)

    async def update(self, container_id: str, **fields: object) -> None:
        await self.daemon.runtime.update_container_resources(cri.UpdateContainerResourcesRequest(
            container_id=container_id,
            linux=cri.LinuxContainerResources(**fields),  # type: ignore[arg-type]
        ))

    async def status(self, container_id: str) -> cri.ContainerStatus:
        reply = await self.daemon.runtime.container_status(
            cri.ContainerStatusRequest(container_id=container_id))
        assert reply.status is not None
        return reply.status

    def cgroup_file(self, container_id: str, controller: str, name: str) -> Path:
        bundle = self.daemon.state / "containers" / container_id / "bundle"
        cgroups_path = json.loads((bundle / "config.json").read_text())["linux"]["cgroupsPath"]
        directory = cgroups.cgroup_dir(cgroups_path, controller)
        assert directory is not None
        return directory / name


@pytest.fixture
async def pod(daemon: Daemon, busybox_ref: str) -> AsyncIterator[ResourcePod]:
    yield await ResourcePod.start(daemon, busybox_ref, "resources")


@pytest.mark.skipif(cgroups.is_unified(), reason="reads cgroup v1 files")
async def test_update_applies_to_cgroup(pod: ResourcePod) -> None:
    container_id = await pod.run("limited", "sleep 3600")

    await pod.update(container_id, memory_limit_in_bytes=64 * MIB, cpu_period=100000,
                     cpu_quota=50000, cpu_shares=512)

    memory = pod.cgroup_file(container_id, "memory", "memory.limit_in_bytes")
    assert int(memory.read_text()) == 64 * MIB
    quota = pod.cgroup_file(container_id, "cpu", "cpu.cfs_quota_us")
    assert int(quota.read_text()) == 50000
    shares = pod.cgroup_file(container_id, "cpu", "cpu.shares")
    assert int(shares.read_text()) == 512


async def test_update_shows_in_status(pod: ResourcePod) -> None:
    container_id = await pod.run("reported", "sleep 3600")

    await pod.update(container_id, memory_limit_in_bytes=64 * MIB, cpu_shares=256)
    await pod.update(container_id, cpu_quota=20000, cpu_period=100000)

    status = await pod.status(container_id)
    assert status.resources is not None
    linux = status.resources.linux
    assert linux is not None
    assert linux.memory_limit_in_bytes == 64 * MIB
    assert linux.cpu_shares == 256
    assert linux.cpu_quota == 20000


async def test_update_reaches_bundle_spec(pod: ResourcePod) -> None:
    container_id = await pod.run("spec", "sleep 3600")

    await pod.update(container_id, memory_limit_in_bytes=48 * MIB)

    bundle = pod.daemon.state / "containers" / container_id / "bundle"
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["linux"]["resources"]["memory"]["limit"] == 48 * MIB


async def test_update_of_exited_container_fails(pod: ResourcePod) -> None:
    config = container_config(pod.image, "gone", command=["true"])
    container_id = await run_container(pod.daemon.runtime, pod.sandbox_id, pod.config, config)
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    with pytest.raises(GRPCError) as caught:
        await pod.update(container_id, memory_limit_in_bytes=64 * MIB)

    assert caught.value.status == Status.FAILED_PRECONDITION


async def test_update_of_unknown_container_fails(pod: ResourcePod) -> None:
    with pytest.raises(GRPCError) as caught:
        await pod.update("e" * 64, memory_limit_in_bytes=64 * MIB)

    assert caught.value.status == Status.NOT_FOUND


async def test_memory_hog_is_oom_killed(pod: ResourcePod) -> None:
    # The container waits for its limit, then keeps 100 MiB without newlines in tail's buffer.
    container_id = await pod.run(
        "hog", "while [ ! -e /tmp/go ]; do usleep 20000; done; head -c 100m /dev/zero | tail")
    await pod.update(container_id, memory_limit_in_bytes=16 * MIB)

    await pod.daemon.runtime.exec_sync(cri.ExecSyncRequest(
        container_id=container_id, cmd=["touch", "/tmp/go"], timeout=5))
    status = await wait_for_state(pod.daemon.runtime, container_id,
                                  cri.ContainerState.CONTAINER_EXITED)

    assert status.reason == "OOMKilled"
    assert status.exit_code == 128 + 9


async def test_error_exit_reason(pod: ResourcePod) -> None:
    config = container_config(pod.image, "fails", command=["sh", "-c", "exit 3"])
    container_id = await run_container(pod.daemon.runtime, pod.sandbox_id, pod.config, config)

    status = await wait_for_state(pod.daemon.runtime, container_id,
                                  cri.ContainerState.CONTAINER_EXITED)

    assert status.reason == "Error"
    assert status.exit_code == 3
