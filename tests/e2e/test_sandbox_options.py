"""Pod sandbox options end to end: sandbox image, DNS, host mounts and the TCP listener."""

from __future__ import annotations

import json
from pathlib import Path

from grpclib.client import Channel

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon
from tests.support.imagebuild import busybox_image, push_image
from tests.support.registry import Registry, free_port


async def infra_pid(daemon: Daemon, sandbox_id: str) -> int:
    status = await daemon.runtime.pod_sandbox_status(
        cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
    return int(json.loads(status.info["info"])["infra_pid"])


async def test_configured_sandbox_image_is_pulled_and_pinned(registry: Registry) -> None:
    pause = busybox_image(entrypoint=["sleep", "100000"], cmd=[])
    push_image(registry.host, "test/pause", "3", pause)
    server = Daemon({"podSandbox": {"imageRepository": f"{registry.host}/test/pause",
                                    "imageTag": "3"}})
    try:
        server.start()
        run = await server.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=sandbox_config("paused")))
        pid = await infra_pid(server, run.pod_sandbox_id)
        image = await server.images.image_status(cri.ImageStatusRequest(
            image=cri.ImageSpec(image=f"{registry.host}/test/pause:3")))

        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"100000"]
        assert image.image is not None
        assert image.image.pinned
    finally:
        server.cleanup()


async def test_default_infra_is_catatonit(daemon: Daemon) -> None:
    run = await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=sandbox_config("infra")))
    pid = await infra_pid(daemon, run.pod_sandbox_id)

    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"/catatonit", b"-P"]
    assert (await daemon.images.list_images(cri.ListImagesRequest())).images == []


async def test_dns_config_becomes_resolv_conf(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    pod = sandbox_config("dns", log_directory=daemon.logs)
    pod.dns_config = cri.DnsConfig(servers=["10.96.0.10"], searches=["default.svc.cluster.local"],
                                   options=["ndots:5"])
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    config = container_config(busybox_ref, "dns", log_path="dns.log",
                              command=["cat", "/etc/resolv.conf"])

    container_id = await run_container(daemon.runtime, sandbox_id, pod, config)
    await wait_for_state(daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    lines = [line.split(" F ", 1)[1] for line in (daemon.logs / "dns.log").read_text().splitlines()]
    assert lines == ["nameserver 10.96.0.10", "search default.svc.cluster.local", "options ndots:5"]


async def test_host_path_mount_read_only(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    shared = daemon.workdir / "shared"
    shared.mkdir()
    (shared / "data.txt").write_text("from the host\n")
    pod = sandbox_config("mounts", log_directory=daemon.logs)
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    config = container_config(busybox_ref, "mounts", log_path="mounts.log", command=[
        "sh", "-c", "cat /data/data.txt; touch /data/new 2>/dev/null && echo writable || echo ro"])
    config.mounts = [cri.Mount(container_path="/data", host_path=str(shared), readonly=True)]

    container_id = await run_container(daemon.runtime, sandbox_id, pod, config)
    await wait_for_state(daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    lines = [line.split(" F ", 1)[1] for line in
             (daemon.logs / "mounts.log").read_text().splitlines()]
    assert lines == ["from the host", "ro"]
    assert not (shared / "new").exists()


async def test_tcp_listener_on_loopback() -> None:
    port = free_port()
    server = Daemon({"criPort": f"127.0.0.1:{port}"})
    try:
        server.start()
        channel = Channel("127.0.0.1", port)
        try:
            version = await cri.RuntimeServiceStub(channel).version(cri.VersionRequest())
        finally:
            channel.close()

        assert version.runtime_name == "servin-shim"
    finally:
        server.cleanup()
