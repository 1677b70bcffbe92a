"""Runtime handlers: runc by default, crun where the host's cgroup layout allows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon


def cgroup_layout() -> str:
    """Return "v2", "v1" or "hybrid" for this host's /sys/fs/cgroup."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "v1"


async def test_default_handler_is_runc(daemon: Daemon) -> None:
    config = sandbox_config("default-handler")
    run = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    status = await daemon.runtime.pod_sandbox_status(
        cri.PodSandboxStatusRequest(pod_sandbox_id=run.pod_sandbox_id))

    assert status.status is not None
    assert status.status.runtime_handler == "runc"
    assert daemon.runc_containers() == [run.pod_sandbox_id]


async def test_crun_handler_runs_container(daemon: Daemon, busybox_ref: str) -> None:
    if cgroup_layout() == "hybrid":
        pytest.skip("crun refuses hosts with cgroups in hybrid mode (v1 controllers plus a "
                    "cgroup2 mount); it runs on pure cgroup v1 or v2 hosts")
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    pod = sandbox_config("crun", log_directory=daemon.logs)
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod, runtime_handler="crun"))).pod_sandbox_id
    config = container_config(busybox_ref, "hello", log_path="crun.log",
                              command=["sh", "-c", "echo from crun"])

    container_id = await run_container(daemon.runtime, sandbox_id, pod, config)
    status = await wait_for_state(daemon.runtime, container_id,
                                  cri.ContainerState.CONTAINER_EXITED)

    assert status.exit_code == 0
    assert (daemon.logs / "crun.log").read_text().rstrip().endswith("stdout F from crun")
