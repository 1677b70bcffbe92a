"""Kubelet's rules for a container's process, run in real containers: command and args against
the image Entrypoint and Cmd, every form of USER, env overrides and the working directory."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import sandbox_config, wait_for_state
from tests.support.daemon import Daemon
from tests.support.imagebuild import Pusher, busybox_image
from tests.support.registry import Registry

ID_SCRIPT = 'echo "$(id -u) $(id -g) $(id -G)"'


async def image_ref(daemon: Daemon, registry: Registry, **image: object) -> str:
    """Push a busybox image with the given config and pull it into the daemon."""
    built = busybox_image(**image)  # type: ignore[arg-type]
    with Pusher(registry.host) as pusher:
        ref = pusher.push_image("test/semantics", uuid.uuid4().hex[:12], built)
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=ref)))
    return ref


async def run_output(daemon: Daemon, image: str, name: str, **fields: object) -> str:
    """Run a container in a fresh pod and return its stdout, without the CRI log prefixes."""
    pod = sandbox_config(name, log_directory=daemon.logs)
    sandbox = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod))
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                 image=cri.ImageSpec(image=image), log_path=f"{name}.log",
                                 **fields)  # type: ignore[arg-type]
    created = await daemon.runtime.create_container(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox.pod_sandbox_id, config=config, sandbox_config=pod))
    await daemon.runtime.start_container(
        cri.StartContainerRequest(container_id=created.container_id))
    await wait_for_state(daemon.runtime, created.container_id,
                         cri.ContainerState.CONTAINER_EXITED)
    lines = (daemon.logs / f"{name}.log").read_text().splitlines()
    return "\n".join(line.split(" ", 3)[3] for line in lines if " stdout " in line)


async def test_command_args_table(daemon: Daemon, registry: Registry) -> None:
    with_entrypoint = await image_ref(daemon, registry, entrypoint=["echo", "ep"], cmd=["cmd"])
    cmd_only = await image_ref(daemon, registry, cmd=["echo", "cmd"])
    cases = [
        ("ep-cmd", with_entrypoint, {}, "ep cmd"),
        ("ep-args", with_entrypoint, {"args": ["a1", "a2"]}, "ep a1 a2"),
        ("command", with_entrypoint, {"command": ["echo", "c"]}, "c"),
        ("command-args", with_entrypoint, {"command": ["echo", "c"], "args": ["a"]}, "c a"),
        ("cmd", cmd_only, {}, "cmd"),
        ("cmd-args", cmd_only, {"args": ["echo", "a"]}, "a"),
    ]
    outputs = await asyncio.gather(*(run_output(daemon, image, name, **fields)
                                     for name, image, fields, _ in cases))
    for (name, _, _, expected), output in zip(cases, outputs, strict=True):
        assert output == expected, name


async def test_user_forms(daemon: Daemon, registry: Registry) -> None:
    cases = [
        ("name", "app", {}, "1000 1000 1000"),
        ("uid", "1000", {}, "1000 1000 1000"),
        ("uid-gid", "1000:65534", {}, "1000 65534 65534"),
        ("name-group", "app:nogroup", {}, "1000 65534 65534"),
        ("unlisted-uid", "4242", {}, "4242 0 0"),
        ("run-as-user", "app", {"run_as_user": cri.Int64Value(value=0)}, "0 0 0"),
        ("run-as-username", "", {"run_as_username": "nobody"}, "65534 65534 65534"),
        ("run-as-group", "app", {"run_as_group": cri.Int64Value(value=0),
                                 "supplemental_groups": [7]}, "1000 0 0 7"),
    ]
    images = await asyncio.gather(*(image_ref(daemon, registry, user=user)
                                    for _, user, _, _ in cases))
    outputs = await asyncio.gather(*(
        run_output(daemon, image, name, command=["sh", "-c", ID_SCRIPT],
                   linux=cri.LinuxContainerConfig(
                       security_context=cri.LinuxContainerSecurityContext(**context)))
        for (name, _, context, _), image in zip(cases, images, strict=True)))
    for (name, _, _, expected), output in zip(cases, outputs, strict=True):
        assert output == expected, name


async def test_unknown_user_rejected(daemon: Daemon, registry: Registry) -> None:
    image = await image_ref(daemon, registry, user="ghost")
    pod = sandbox_config("ghost")
    sandbox = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod))
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="ghost"),
                                 image=cri.ImageSpec(image=image))

    with pytest.raises(GRPCError) as caught:
        await daemon.runtime.create_container(cri.CreateContainerRequest(
            pod_sandbox_id=sandbox.pod_sandbox_id, config=config, sandbox_config=pod))

    assert caught.value.status == Status.INVALID_ARGUMENT
    assert "'ghost'" in str(caught.value.message)


async def test_env_overrides_image(daemon: Daemon, registry: Registry) -> None:
    image = await image_ref(daemon, registry, env=["FOO=image", "KEEP=yes", "BARE"])
    output = await run_output(
        daemon, image, "env", command=["sh", "-c", 'echo "$FOO $KEEP $NEW"; env | grep -c ^PATH='],
        envs=[cri.KeyValue(key="FOO", value="cri"), cri.KeyValue(key="NEW", value="a=b")])
    assert output.splitlines() == ["cri yes a=b", "1"]


async def test_workdir_created_for_user(daemon: Daemon, registry: Registry) -> None:
    image = await image_ref(daemon, registry, user="app", working_dir="/data/app")
    output = await run_output(daemon, image, "workdir",
                              command=["sh", "-c", 'echo "$PWD $(stat -c %u:%g .)"'])
    assert output == "/data/app 1000:1000"


async def test_working_dir_request_wins(daemon: Daemon, registry: Registry) -> None:
    image = await image_ref(daemon, registry, working_dir="/home")
    output = await run_output(daemon, image, "cwd", command=["pwd"], working_dir="/tmp")
    assert output == "/tmp"
