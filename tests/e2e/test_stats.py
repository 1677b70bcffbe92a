"""ContainerStats and PodSandboxStats read from the container's cgroups and upper directory."""

from __future__ import annotations

import asyncio

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon


async def test_container_stats_of_busy_container(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    pod = sandbox_config("stats")
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    # Burn CPU and leave a 1 MiB file in the writable layer.
    config = container_config(busybox_ref, "busy", command=[
        "sh", "-c", "head -c 1048576 /dev/zero > /blob; while true; do :; done"])
    container_id = await run_container(daemon.runtime, sandbox_id, pod, config)
    await wait_for_state(daemon.runtime, container_id, cri.ContainerState.CONTAINER_RUNNING)
    await asyncio.sleep(0.5)

    first = await daemon.runtime.container_stats(
        cri.ContainerStatsRequest(container_id=container_id))
    await asyncio.sleep(0.5)
    second = await daemon.runtime.container_stats(
        cri.ContainerStatsRequest(container_id=container_id))
    listed = await daemon.runtime.list_container_stats(cri.ListContainerStatsRequest())
    pods = await daemon.runtime.list_pod_sandbox_stats(cri.ListPodSandboxStatsRequest())

    stats = second.stats
    assert stats is not None
    assert stats.attributes is not None
    assert stats.attributes.id == container_id
    assert first.stats is not None and first.stats.cpu is not None
    assert stats.cpu is not None and stats.cpu.usage_core_nano_seconds is not None
    assert first.stats.cpu.usage_core_nano_seconds is not None
    assert stats.cpu.usage_core_nano_seconds.value > first.stats.cpu.usage_core_nano_seconds.value
    assert stats.cpu.usage_nano_cores is not None
    # A busy loop uses most of one core.
    assert stats.cpu.usage_nano_cores.value > 200_000_000
    assert stats.memory is not None and stats.memory.working_set_bytes is not None
    assert stats.memory.working_set_bytes.value > 0
    assert stats.writable_layer is not None and stats.writable_layer.used_bytes is not None
    assert stats.writable_layer.used_bytes.value >= 1048576
    assert [s.attributes.id for s in listed.stats if s.attributes] == [container_id]
    assert len(pods.stats) == 1
    pod_stats = pods.stats[0]
    assert pod_stats.attributes is not None and pod_stats.attributes.id == sandbox_id
    assert pod_stats.linux is not None
    assert [c.attributes.id for c in pod_stats.linux.containers if c.attributes] == [container_id]
    assert pod_stats.linux.process is not None and pod_stats.linux.process.process_count is not None
    assert pod_stats.linux.process.process_count.value >= 2
