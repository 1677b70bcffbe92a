"""Edge cases of the CRI surface on real runc: invalid input rejected before any side effect,
runtime failures that leave nothing behind, and sandboxes that stay removable."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import Pod, container_config, sandbox_config, wait_for_state
from tests.support.daemon import Daemon
from tests.support.imagebuild import busybox_image, push_image
from tests.support.registry import Registry

UNKNOWN_ID = "0" * 64


def leftovers(daemon: Daemon) -> list[str]:
    """Return sandbox and container directories and network namespaces the daemon kept."""
    found = []
    for directory in (daemon.root / "sandboxes", daemon.state / "sandboxes",
                      daemon.root / "containers", daemon.state / "containers",
                      daemon.state / "netns"):
        if directory.is_dir():
            found += [str(p) for p in directory.iterdir()]
    return found


def set_recorded_stop_signal(daemon: Daemon, container_id: str, name: str) -> None:
    """Write ``name`` into a container record, as a record from before the create check."""
    with sqlite3.connect(daemon.root / "servin.db") as conn:
        conn.execute("UPDATE containers SET data = json_set(data, '$.stop_signal', ?) "
                     "WHERE id = ?", (name, container_id))


async def wait_for_log(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never appeared in {path}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def bogus_signal_ref(registry: Registry) -> str:
    image = busybox_image(cmd=["sleep", "30"], stop_signal="SIGBOGUS")
    return push_image(registry.host, "test/bogus-signal", "1", image)


@pytest.fixture
def broken_runtime_dir() -> Iterator[Path]:
    """A directory for a runc wrapper that fails every command once ``broken`` exists."""
    directory = Path(tempfile.mkdtemp(prefix="svr-", dir="/tmp"))
    script = directory / "flaky-runc"
    script.write_text(
        "#!/bin/sh\n"
        f"if [ -e {directory}/broken ]; then echo 'runtime is broken' >&2; exit 1; fi\n"
        'exec runc "$@"\n'
    )
    script.chmod(0o755)
    try:
        yield directory
    finally:
        root = directory / "root"
        if root.exists():
            out = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                                 capture_output=True, check=False).stdout
            for item in json.loads(out or b"null") or []:
                subprocess.run(["runc", "--root", str(root), "delete", "--force", item["id"]],
                               capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


@pytest.fixture
async def flaky_daemon(broken_runtime_dir: Path) -> AsyncIterator[Daemon]:
    """A daemon with the extra handlers ``falsy`` (/bin/false) and ``flaky`` (see above)."""
    server = Daemon({"runtime": {"runtimeHandlers": {
        "falsy": {"runtimeEngine": "/bin/false"},
        "flaky": {"runtimeEngine": str(broken_runtime_dir / "flaky-runc"),
                  "runtimeRoot": str(broken_runtime_dir / "root")},
    }}})
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


# Stop signals


async def test_bad_stop_signal_rejected_at_create(daemon: Daemon, bogus_signal_ref: str) -> None:
    pod = await Pod.start(daemon, bogus_signal_ref, "bogus-create")
    with pytest.raises(GRPCError) as error:
        await pod.run_config(container_config(bogus_signal_ref, "bogus"))
    listed = await daemon.runtime.list_containers(cri.ListContainersRequest())

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "SIGBOGUS" in (error.value.message or "")
    assert bogus_signal_ref in (error.value.message or "")
    assert listed.containers == []
    assert not list((daemon.root / "containers").glob("*"))


async def test_recorded_bad_signal_still_stops(daemon: Daemon, busybox_ref: str) -> None:
    pod = await Pod.start(daemon, busybox_ref, "bogus-stop")
    graceful = await pod.run("graceful", 'trap "exit 7" TERM; echo ready; '
                                         "while :; do sleep 0.1; done", wait_running=True)
    killed = await pod.run("killed", "sleep 30", wait_running=True)
    await wait_for_log(daemon.logs / "graceful.log", "ready")
    for container_id in (graceful, killed):
        set_recorded_stop_signal(daemon, container_id, "SIGBOGUS")

    await daemon.runtime.stop_container(cri.StopContainerRequest(container_id=graceful, timeout=5))
    status = await wait_for_state(daemon.runtime, graceful, cri.ContainerState.CONTAINER_EXITED)
    await daemon.runtime.remove_container(cri.RemoveContainerRequest(container_id=killed))
    await daemon.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id))
    await daemon.runtime.remove_pod_sandbox(
        cri.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id))

    # Exit code 7 comes from the TERM trap, so SIGTERM replaced the unparsable signal.
    assert status.exit_code == 7
    assert "invalid stop signal 'SIGBOGUS'" in daemon.log_text()
    assert daemon.runc_containers() == []


# Runtime failures


@pytest.mark.parametrize("handler", ["falsy", "crun"])
async def test_failed_sandbox_reports_create_error(flaky_daemon: Daemon, handler: str) -> None:
    if handler == "crun" and not Path("/sys/fs/cgroup/unified/cgroup.controllers").exists():
        pytest.skip("crun fails only on hybrid cgroup hosts")
    with pytest.raises(GRPCError) as error:
        await flaky_daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(
            config=sandbox_config(f"fails-{handler}"), runtime_handler=handler))
    listed = await flaky_daemon.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    message = error.value.message or ""

    assert error.value.status is Status.INTERNAL
    assert f"{handler} " in message
    assert "create of container" in message
    assert "kill failed" not in message
    assert listed.items == []
    assert leftovers(flaky_daemon) == []
    assert flaky_daemon.mounts() == []


async def test_crun_error_names_runtime_log(flaky_daemon: Daemon) -> None:
    if not Path("/sys/fs/cgroup/unified/cgroup.controllers").exists():
        pytest.skip("crun fails only on hybrid cgroup hosts")
    with pytest.raises(GRPCError) as error:
        await flaky_daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(
            config=sandbox_config("crun-log"), runtime_handler="crun"))

    # The text crun 1.8.1 writes to runtime.log on a hybrid cgroup host.
    assert "cgroups in hybrid mode" in (error.value.message or "")


async def test_broken_runtime_sandbox_removable(
    flaky_daemon: Daemon, broken_runtime_dir: Path
) -> None:
    run = await flaky_daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(
        config=sandbox_config("flaky"), runtime_handler="flaky"))
    (broken_runtime_dir / "broken").touch()

    await flaky_daemon.runtime.stop_pod_sandbox(
        cri.StopPodSandboxRequest(pod_sandbox_id=run.pod_sandbox_id))
    await flaky_daemon.runtime.remove_pod_sandbox(
        cri.RemovePodSandboxRequest(pod_sandbox_id=run.pod_sandbox_id))
    listed = await flaky_daemon.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())

    assert listed.items == []
    assert leftovers(flaky_daemon) == []
    assert flaky_daemon.mounts() == []
    assert "runtime is broken" in flaky_daemon.log_text()


# UpdateContainerResources


@pytest.mark.parametrize("linux", [None, cri.LinuxContainerResources(cpu_shares=512)])
async def test_update_unknown_container_not_found(
    daemon: Daemon, linux: cri.LinuxContainerResources | None
) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.runtime.update_container_resources(cri.UpdateContainerResourcesRequest(
            container_id=UNKNOWN_ID, linux=linux))

    assert error.value.status is Status.NOT_FOUND


@pytest.mark.parametrize(("field", "value"), [
    ("cpu_shares", -2), ("memory_limit_in_bytes", -1), ("cpu_quota", -2), ("cpu_period", -1),
])
async def test_update_negative_value_rejected(
    daemon: Daemon, busybox_ref: str, field: str, value: int
) -> None:
    pod = await Pod.start(daemon, busybox_ref, "negative")
    created = await daemon.runtime.create_container(cri.CreateContainerRequest(
        pod_sandbox_id=pod.sandbox_id, config=container_config(busybox_ref, "limits"),
        sandbox_config=pod.config))
    bundle = daemon.state / "containers" / created.container_id / "bundle" / "config.json"
    before = bundle.read_text()
    # cpuset_cpus is valid, so it shows whether anything of the request was kept.
    resources = cri.LinuxContainerResources(cpuset_cpus="0", **{field: value})

    with pytest.raises(GRPCError) as error:
        await daemon.runtime.update_container_resources(cri.UpdateContainerResourcesRequest(
            container_id=created.container_id, linux=resources))
    status = await daemon.runtime.container_status(
        cri.ContainerStatusRequest(container_id=created.container_id))

    assert error.value.status is Status.INVALID_ARGUMENT
    assert field in (error.value.message or "")
    assert bundle.read_text() == before
    assert status.status is not None
    kept = status.status.resources.linux if status.status.resources else None
    assert kept is None or kept.cpuset_cpus == ""


# RunPodSandbox validation


@pytest.mark.parametrize(("change", "value"), [
    ({"hostname": "bad host"}, "bad host"),
    ({"hostname": "h" * 65}, "h" * 65),
    ({"hostname": "host\nname"}, "host\\nname"),
    ({"dns_config": cri.DnsConfig(servers=["not-an-ip"])}, "not-an-ip"),
    ({"dns_config": cri.DnsConfig(searches=["svc local"])}, "svc local"),
    ({"dns_config": cri.DnsConfig(options=["ndots:5\nnameserver 8.8.8.8"])}, "ndots:5"),
])
async def test_invalid_sandbox_config_rejected(
    daemon: Daemon, change: dict[str, object], value: str
) -> None:
    config = sandbox_config("checked")
    for key, item in change.items():
        setattr(config, key, item)

    with pytest.raises(GRPCError) as error:
        await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    listed = await daemon.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())

    assert error.value.status is Status.INVALID_ARGUMENT
    assert value in (error.value.message or "")
    assert listed.items == []
    assert leftovers(daemon) == []


async def test_failed_sandbox_removes_directories(flaky_daemon: Daemon) -> None:
    config = sandbox_config("cleaned")
    config.dns_config = cri.DnsConfig(servers=["10.96.0.10"], searches=["svc.local"])
    with pytest.raises(GRPCError):
        await flaky_daemon.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=config, runtime_handler="falsy"))

    assert not list((flaky_daemon.root / "sandboxes").glob("*"))
    assert not list((flaky_daemon.state / "sandboxes").glob("*"))


# Image references


async def test_image_status_invalid_reference(daemon: Daemon) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.images.image_status(
            cri.ImageStatusRequest(image=cri.ImageSpec(image="UPPER/Case:!!")))

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "UPPER/Case:!!" in (error.value.message or "")


async def test_image_status_missing_is_empty(daemon: Daemon) -> None:
    reply = await daemon.images.image_status(
        cri.ImageStatusRequest(image=cri.ImageSpec(image="example.invalid/missing:1")))

    assert reply.image is None


async def test_create_invalid_image_reference(daemon: Daemon, busybox_ref: str) -> None:
    pod = await Pod.start(daemon, busybox_ref, "bad-ref")
    with pytest.raises(GRPCError) as error:
        await pod.run_config(container_config("UPPER/Case:!!", "bad-ref"))

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "UPPER/Case:!!" in (error.value.message or "")


async def test_pull_unknown_digest_message(daemon: Daemon, registry: Registry,
                                           busybox_ref: str) -> None:
    digest = "sha256:" + "0" * 64
    with pytest.raises(GRPCError) as error:
        await daemon.images.pull_image(cri.PullImageRequest(
            image=cri.ImageSpec(image=f"{registry.host}/test/busybox@{digest}")))

    assert error.value.status is Status.NOT_FOUND
    assert f"test/busybox@{digest}" in (error.value.message or "")


# RuntimeConfig


async def test_runtime_config_cgroupfs(daemon: Daemon) -> None:
    reply = await daemon.runtime.runtime_config(cri.RuntimeConfigRequest())

    assert reply.linux is not None
    assert reply.linux.cgroup_driver is cri.CgroupDriver.CGROUPFS


async def test_create_with_negative_memory_is_invalid(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    pod = sandbox_config("negative")
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="negative"),
        image=cri.ImageSpec(image=busybox_ref),
        linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=-1)),
    )

    with pytest.raises(GRPCError) as error:
        await daemon.runtime.create_container(cri.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=config, sandbox_config=pod))

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "memory_limit_in_bytes" in (error.value.message or "")
    listed = await daemon.runtime.list_containers(cri.ListContainersRequest())
    assert listed.containers == []
