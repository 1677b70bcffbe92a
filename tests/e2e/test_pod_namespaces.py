"""Namespace sharing of pods in real containers: pod IPC and PID, host network and PID, the
TARGET pid mode, hostname and namespaced sysctls."""

from __future__ import annotations

import os

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import sandbox_config, wait_for_state
from tests.support.daemon import Daemon


async def start_pod(daemon: Daemon, busybox_ref: str, name: str,
                    **linux: object) -> tuple[str, cri.PodSandboxConfig]:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    config = sandbox_config(name, log_directory=daemon.logs, **linux)
    run = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    return run.pod_sandbox_id, config


async def start(daemon: Daemon, image: str, sandbox: tuple[str, cri.PodSandboxConfig],
                name: str, script: str, **fields: object) -> str:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                 image=cri.ImageSpec(image=image), command=["sh", "-c", script],
                                 log_path=f"{name}.log", **fields)  # type: ignore[arg-type]
    created = await daemon.runtime.create_container(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox[0], config=config, sandbox_config=sandbox[1]))
    await daemon.runtime.start_container(
        cri.StartContainerRequest(container_id=created.container_id))
    return created.container_id


async def output(daemon: Daemon, image: str, sandbox: tuple[str, cri.PodSandboxConfig],
                 name: str, script: str, **fields: object) -> str:
    container_id = await start(daemon, image, sandbox, name, script, **fields)
    await wait_for_state(daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)
    lines = (daemon.logs / f"{name}.log").read_text().splitlines()
    return "\n".join(line.split(" ", 3)[3] for line in lines)


def namespaces(network: int = 0, pid: int = 1, ipc: int = 0) -> cri.LinuxSandboxSecurityContext:
    return cri.LinuxSandboxSecurityContext(namespace_options=cri.NamespaceOption(
        network=cri.NamespaceMode(network), pid=cri.NamespaceMode(pid), ipc=cri.NamespaceMode(ipc)))


async def test_pod_shares_ipc_and_uts(daemon: Daemon, busybox_ref: str) -> None:
    pod = await start_pod(daemon, busybox_ref, "share")
    script = "readlink /proc/self/ns/ipc /proc/self/ns/uts; hostname"
    first = await output(daemon, busybox_ref, pod, "first", script)
    second = await output(daemon, busybox_ref, pod, "second", script)
    assert first == second
    assert first.splitlines()[-1] == "share"


async def test_pid_mode_pod_sees_infra(daemon: Daemon, busybox_ref: str) -> None:
    pod = await start_pod(daemon, busybox_ref, "pidpod",
                          security_context=namespaces(pid=cri.NamespaceMode.POD))
    shared = await output(daemon, busybox_ref, pod, "shared", "cat /proc/1/cmdline",
                          linux=cri.LinuxContainerConfig(security_context=(
                              cri.LinuxContainerSecurityContext(namespace_options=(
                                  cri.NamespaceOption(pid=cri.NamespaceMode.POD))))))
    assert shared.startswith("/catatonit")


async def test_pid_mode_container_is_own_init(daemon: Daemon, busybox_ref: str) -> None:
    pod = await start_pod(daemon, busybox_ref, "pidown")
    own = await output(daemon, busybox_ref, pod, "own", "cat /proc/1/cmdline; true")
    assert own.startswith("sh")


async def test_pid_mode_target(daemon: Daemon, busybox_ref: str) -> None:
    pod = await start_pod(daemon, busybox_ref, "target")
    target = await start(daemon, busybox_ref, pod, "sleeper", "exec sleep 30")
    await wait_for_state(daemon.runtime, target, cri.ContainerState.CONTAINER_RUNNING)
    options = cri.NamespaceOption(pid=cri.NamespaceMode.TARGET, target_id=target)
    seen = await output(daemon, busybox_ref, pod, "debug", "cat /proc/1/cmdline | tr '\\0' ' '",
                        linux=cri.LinuxContainerConfig(security_context=(
                            cri.LinuxContainerSecurityContext(namespace_options=options))))
    assert seen.strip() == "sleep 30"


async def test_host_network_and_pid(daemon: Daemon, busybox_ref: str) -> None:
    pod = await start_pod(daemon, busybox_ref, "hostns", security_context=namespaces(
        network=cri.NamespaceMode.NODE, pid=cri.NamespaceMode.NODE))
    seen = await output(daemon, busybox_ref, pod, "hostns", "ls /sys/class/net; hostname",
                        linux=cri.LinuxContainerConfig(security_context=(
                            cri.LinuxContainerSecurityContext(namespace_options=(
                                cri.NamespaceOption(pid=cri.NamespaceMode.NODE))))))
    lines = seen.splitlines()
    assert sorted(lines[:-1]) == sorted(os.listdir("/sys/class/net"))
    assert lines[-1] == os.uname().nodename


async def test_pod_sysctls_applied(daemon: Daemon, busybox_ref: str) -> None:
    pod = await start_pod(daemon, busybox_ref, "sysctl", sysctls={
        "net.ipv4.ip_unprivileged_port_start": "100", "kernel.shm_rmid_forced": "1"})
    seen = await output(daemon, busybox_ref, pod, "sysctl",
                        "cat /proc/sys/net/ipv4/ip_unprivileged_port_start "
                        "/proc/sys/kernel/shm_rmid_forced")
    assert seen.splitlines() == ["100", "1"]


async def test_net_sysctl_with_host_network_rejected(daemon: Daemon, busybox_ref: str) -> None:
    with pytest.raises(GRPCError) as caught:
        await start_pod(daemon, busybox_ref, "badsysctl",
                        security_context=namespaces(network=cri.NamespaceMode.NODE),
                        sysctls={"net.ipv4.ip_forward": "1"})
    assert caught.value.status == Status.INVALID_ARGUMENT
    assert "net.ipv4.ip_forward" in str(caught.value.message)
    assert daemon.runc_containers() == []


async def test_pod_target_mode_rejected(daemon: Daemon, busybox_ref: str) -> None:
    with pytest.raises(GRPCError) as caught:
        await start_pod(daemon, busybox_ref, "badtarget",
                        security_context=namespaces(pid=cri.NamespaceMode.TARGET))
    assert caught.value.status == Status.INVALID_ARGUMENT
