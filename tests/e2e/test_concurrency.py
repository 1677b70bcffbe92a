"""Many pods at once: no global lock, no zombie left behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon

POD_COUNT = 50


def zombie_children(pid: int) -> list[int]:
    """Return the zombie children of ``pid``."""
    zombies = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            zombies.append(int(stat.parent.name))
    return zombies


async def test_fifty_pods_start_concurrently(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))

    async def one_pod(index: int) -> str:
        pod = sandbox_config(f"pod-{index}", log_directory=daemon.logs)
        sandbox_id = (await daemon.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
        config = container_config(busybox_ref, "main", log_path=f"pod-{index}.log",
                                  command=["sh", "-c", f"echo {index}; exec sleep 1000"])
        return await run_container(daemon.runtime, sandbox_id, pod, config)

    container_ids = await asyncio.gather(*(one_pod(i) for i in range(POD_COUNT)))
    for container_id in container_ids:
        await wait_for_state(daemon.runtime, container_id, cri.ContainerState.CONTAINER_RUNNING)
    sandboxes = await daemon.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    ready = [s for s in sandboxes.items if s.state == cri.PodSandboxState.SANDBOX_READY]

    assert len(set(container_ids)) == POD_COUNT
    assert len(ready) == POD_COUNT
    for index in range(POD_COUNT):
        assert (daemon.logs / f"pod-{index}.log").read_text().rstrip().endswith(f"F {index}")

    await asyncio.gather(*(daemon.runtime.stop_pod_sandbox(
        cri.StopPodSandboxRequest(pod_sandbox_id=s.id)) for s in sandboxes.items))
    await asyncio.gather(*(daemon.runtime.remove_pod_sandbox(
        cri.RemovePodSandboxRequest(pod_sandbox_id=s.id)) for s in sandboxes.items))

    assert daemon.runc_containers() == []
    assert daemon.mounts() == []
    assert daemon.process is not None
    assert zombie_children(daemon.process.pid) == []
    monitor = daemon.monitor_pid()
    if monitor is not None:
        assert zombie_children(monitor) == []
