"""Request builders and waits shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from servin_shim.api.runtime import v1 as cri


def sandbox_config(name: str = "pod", log_directory: Path | None = None,
                   **linux: object) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="default", uid=str(uuid.uuid4())),
        hostname=name,
        log_directory=str(log_directory) if log_directory else "",
        labels={"app": name},
        annotations={"note": "e2e"},
        linux=cri.LinuxPodSandboxConfig(**linux) if linux else None,  # type: ignore[arg-type]
    )


def container_config(image: str, name: str = "c", *, command: list[str] | None = None,
                     args: list[str] | None = None, log_path: str = "",
                     envs: dict[str, str] | None = None, working_dir: str = "") -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name),
        image=cri.ImageSpec(image=image),
        command=command or [],
        args=args or [],
        envs=[cri.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        working_dir=working_dir,
        log_path=log_path,
        labels={"container": name},
        annotations={"a": "b"},
    )


async def wait_for_state(runtime: cri.RuntimeServiceStub, container_id: str,
                         state: cri.ContainerState, timeout: float = 30.0) -> cri.ContainerStatus:
    deadline = time.monotonic() + timeout
    while True:
        reply = await runtime.container_status(cri.ContainerStatusRequest(container_id=container_id))
        assert reply.status is not None
        if reply.status.state == state:
            return reply.status
        if time.monotonic() > deadline:
            raise AssertionError(f"container {container_id} stayed {reply.status.state!r}")
        await asyncio.sleep(0.05)


async def run_container(daemon_runtime: cri.RuntimeServiceStub, sandbox_id: str,
                        sandbox: cri.PodSandboxConfig, config: cri.ContainerConfig) -> str:
    created = await daemon_runtime.create_container(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox))
    await daemon_runtime.start_container(
        cri.StartContainerRequest(container_id=created.container_id))
    return created.container_id
