"""The main path on real parts: pull, run a pod, run a container, read its log, clean up."""

from __future__ import annotations

import re
from pathlib import Path

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon, process_alive

CRI_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d) (stdout|stderr) (F|P) (.*)$"
)


async def test_pod_lifecycle_end_to_end(daemon: Daemon, busybox_ref: str) -> None:
    runtime, images = daemon.runtime, daemon.images

    pulled = await images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    assert pulled.image_ref.startswith("sha256:")

    sandbox = sandbox_config("lifecycle", log_directory=daemon.logs)
    run = await runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=sandbox))
    sandbox_id = run.pod_sandbox_id
    status = await runtime.pod_sandbox_status(
        cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id))
    assert status.status is not None
    assert status.status.state == cri.PodSandboxState.SANDBOX_READY

    config = container_config(
        busybox_ref, "echo",
        command=["sh", "-c", "echo one; echo two >&2; echo three; hostname; exit 3"],
        log_path="echo/0.log",
    )
    container_id = await run_container(runtime, sandbox_id, sandbox, config)
    exited = await wait_for_state(runtime, container_id, cri.ContainerState.CONTAINER_EXITED)
    assert exited.exit_code == 3
    assert exited.reason == "Error"
    assert exited.started_at > 0
    assert exited.finished_at >= exited.started_at

    lines = (daemon.logs / "echo" / "0.log").read_text().splitlines()
    parsed = [CRI_LOG_LINE.match(line) for line in lines]
    assert all(parsed), lines
    records = [(m.group(2), m.group(3), m.group(4)) for m in parsed if m]
    assert ("stdout", "F", "one") in records
    assert ("stderr", "F", "two") in records
    assert [r for r in records if r[0] == "stdout"] == [
        ("stdout", "F", "one"), ("stdout", "F", "three"), ("stdout", "F", "lifecycle")]

    listed = await runtime.list_containers(cri.ListContainersRequest())
    assert [c.id for c in listed.containers] == [container_id]

    sandbox_status = await runtime.pod_sandbox_status(
        cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
    infra_pid = __import__("json").loads(sandbox_status.info["info"])["infra_pid"]
    assert process_alive(infra_pid)

    await runtime.remove_container(cri.RemoveContainerRequest(container_id=container_id))
    await runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    await runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    assert (await runtime.list_pod_sandbox(cri.ListPodSandboxRequest())).items == []
    assert (await runtime.list_containers(cri.ListContainersRequest())).containers == []
    assert daemon.runc_containers() == []
    assert daemon.mounts() == []
    assert not process_alive(infra_pid)
    assert not Path(f"/sys/fs/cgroup/memory/servin/{sandbox_id}").exists()
    assert not Path(f"/sys/fs/cgroup/unified/servin/{sandbox_id}").exists()
