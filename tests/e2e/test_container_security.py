"""Security settings seen from inside real containers: capabilities, read-only root, no_new_privs,
seccomp profiles, privileged mode, devices, mounts and cgroup resources."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from servin_shim.oci import security
from servin_shim.oci.spec import DEFAULT_CAPABILITIES
from tests.e2e.helpers import Pod, sandbox_config, wait_for_state
from tests.support.daemon import Daemon


def capability_mask(names: list[str]) -> int:
    return sum(1 << security.CAPABILITY_NAMES.index(n.removeprefix("CAP_")) for n in names)


class SecurityPod(Pod):
    """A privileged pod whose containers run a script and report what they saw."""

    async def create(self, name: str, script: str, **fields: object) -> str:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=self.image),
            command=["sh", "-c", script], log_path=f"{name}.log", **fields)  # type: ignore[arg-type]
        created = await self.daemon.runtime.create_container(cri.CreateContainerRequest(
            pod_sandbox_id=self.sandbox_id, config=config, sandbox_config=self.config))
        return created.container_id

    async def output(self, name: str, script: str, **fields: object) -> str:
        """Run ``script`` to completion and return its stdout and stderr lines."""
        container_id = await self.create(name, script, **fields)
        await self.daemon.runtime.start_container(
            cri.StartContainerRequest(container_id=container_id))
        await wait_for_state(self.daemon.runtime, container_id,
                             cri.ContainerState.CONTAINER_EXITED)
        lines = (self.daemon.logs / f"{name}.log").read_text().splitlines()
        return "\n".join(line.split(" ", 3)[3] for line in lines)


def context(**fields: object) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(**fields))  # type: ignore[arg-type]


def status_field(output: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in output.splitlines()
                if line.startswith(name + ":"))


@pytest.fixture
async def pod(daemon: Daemon, busybox_ref: str) -> AsyncIterator[SecurityPod]:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    config = sandbox_config("security", log_directory=daemon.logs,
                            security_context=cri.LinuxSandboxSecurityContext(privileged=True))
    run = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    yield SecurityPod(daemon, busybox_ref, run.pod_sandbox_id, config)


async def test_default_capabilities(pod: SecurityPod) -> None:
    output = await pod.output("caps", "cat /proc/self/status")
    assert int(status_field(output, "CapEff"), 16) == capability_mask(DEFAULT_CAPABILITIES)
    assert int(status_field(output, "CapBnd"), 16) == capability_mask(DEFAULT_CAPABILITIES)


async def test_drop_all_add_one(pod: SecurityPod) -> None:
    caps = cri.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"])
    output = await pod.output("netadmin", "cat /proc/self/status",
                              linux=context(capabilities=caps))
    assert int(status_field(output, "CapEff"), 16) == capability_mask(["CAP_NET_ADMIN"])


async def test_readonly_rootfs_and_no_new_privs(pod: SecurityPod) -> None:
    output = await pod.output(
        "locked", "grep NoNewPrivs /proc/self/status; touch /x 2>/dev/null || echo denied; "
        "touch /tmp/x 2>/dev/null || echo tmp-denied",
        linux=context(readonly_rootfs=True, no_new_privs=True))
    assert status_field(output, "NoNewPrivs") == "1"
    assert "denied" in output.splitlines()
    assert "tmp-denied" in output.splitlines()


async def test_seccomp_default_blocks_unshare(pod: SecurityPod) -> None:
    script = ("grep ^Seccomp: /proc/self/status; "
              "unshare -U true 2>/dev/null && echo allowed || echo blocked")
    confined = await pod.output("confined", script)
    unconfined = await pod.output("unconfined", script, linux=context(seccomp=cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Unconfined)))
    assert status_field(confined, "Seccomp") == "2"
    assert confined.splitlines()[-1] == "blocked"
    assert status_field(unconfined, "Seccomp") == "0"
    assert unconfined.splitlines()[-1] == "allowed"


async def test_seccomp_localhost_profile(pod: Pod, tmp_path: Path) -> None:
    profile = tmp_path / "no-mkdir.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}))
    output = await pod.output(
        "localhost", "mkdir /tmp/d 2>/dev/null && echo made || echo refused",
        linux=context(seccomp=cri.SecurityProfile(
            profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref=str(profile))))
    assert output == "refused"


async def test_privileged_container(pod: SecurityPod) -> None:
    output = await pod.output(
        "privileged", "cat /proc/self/status; ls /dev; grep ' /sys ' /proc/mounts",
        linux=context(privileged=True))
    assert int(status_field(output, "CapEff"), 16) == capability_mask(
        security.all_capabilities())
    assert status_field(output, "Seccomp") == "0"
    assert "loop-control" in output.splitlines()
    sysfs_options = output.splitlines()[-1].split()[3].split(",")
    assert "rw" in sysfs_options


async def test_unprivileged_sysfs_read_only(pod: SecurityPod) -> None:
    output = await pod.output("sysfs", "grep ' /sys ' /proc/mounts")

    assert "ro" in output.split()[3].split(",")


async def test_masked_paths_from_request(pod: SecurityPod) -> None:
    output = await pod.output("masked", "wc -c < /proc/cpuinfo",
                              linux=context(masked_paths=["/proc/cpuinfo"]))
    assert output == "0"


async def test_device_permissions(pod: SecurityPod) -> None:
    # runc always allows its default devices (/dev/null, /dev/zero, ...), so use another one.
    script = "(true > /dev/lc) 2>/dev/null && echo write || echo no-write"
    devices = {}
    for permissions in ("rw", "r"):
        device = cri.Device(host_path="/dev/loop-control", container_path="/dev/lc",
                            permissions=permissions)
        devices[permissions] = await pod.output(f"device-{permissions}", script,
                                                devices=[device])
    assert devices["rw"] == "write"
    assert devices["r"] == "no-write"


async def test_readonly_mount(pod: Pod, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("data")
    mount = cri.Mount(container_path="/ro", host_path=str(tmp_path), readonly=True)
    output = await pod.output("romount", "cat /ro/f; echo; touch /ro/g 2>/dev/null || echo denied",
                              mounts=[mount])
    assert output.splitlines() == ["data", "denied"]


async def test_rshared_needs_shared_mount(pod: Pod, tmp_path: Path) -> None:
    mount = cri.Mount(container_path="/shared", host_path=str(tmp_path),
                      propagation=cri.MountPropagation.PROPAGATION_BIDIRECTIONAL)
    with pytest.raises(GRPCError) as caught:
        await pod.create("rshared", "true", mounts=[mount])
    assert caught.value.status == Status.FAILED_PRECONDITION
    assert str(tmp_path) in str(caught.value.message)


@pytest.fixture
def shared_mount() -> Iterator[Path]:
    """A tmpfs under /tmp marked shared, because / is private on test nodes."""
    point = Path(tempfile.mkdtemp(prefix="svshared-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(point)], check=True)
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
        point.rmdir()


async def test_rshared_on_shared_mount(pod: Pod, shared_mount: Path) -> None:
    mount = cri.Mount(container_path="/shared", host_path=str(shared_mount),
                      propagation=cri.MountPropagation.PROPAGATION_BIDIRECTIONAL)
    output = await pod.output("rsharedok", "grep ' /shared ' /proc/self/mountinfo",
                              mounts=[mount])
    assert "shared:" in output


async def test_cgroup_resources(pod: SecurityPod) -> None:
    resources = cri.LinuxContainerResources(
        cpu_period=100_000, cpu_quota=50_000, cpu_shares=256, cpuset_cpus="0",
        memory_limit_in_bytes=64 << 20, memory_swap_limit_in_bytes=128 << 20, oom_score_adj=500)
    output = await pod.output(
        "limits", "cd /sys/fs/cgroup; cat cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us "
        "cpu/cpu.shares cpuset/cpuset.cpus memory/memory.limit_in_bytes "
        "memory/memory.memsw.limit_in_bytes /proc/self/oom_score_adj",
        linux=cri.LinuxContainerConfig(resources=resources))
    assert output.splitlines() == ["50000", "100000", "256", "0", str(64 << 20), str(128 << 20),
                                   "500"]


async def test_oom_score_adj_clamped(pod: SecurityPod) -> None:
    own = Path("/proc/self/oom_score_adj").read_text().strip()
    resources = cri.LinuxContainerResources(oom_score_adj=-1000)
    output = await pod.output("oom", "cat /proc/self/oom_score_adj",
                              linux=cri.LinuxContainerConfig(resources=resources))
    assert output == own
