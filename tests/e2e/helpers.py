"""Request builders and waits shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

from servin_shim.api.runtime import v1 as cri

if TYPE_CHECKING:
    from tests.support.daemon import Daemon


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


@dataclass
class Pod:
    """A ready pod sandbox in a test daemon, with the image its containers run."""

    daemon: Daemon
    image: str
    sandbox_id: str
    config: cri.PodSandboxConfig

    @classmethod
    async def start(cls, daemon: Daemon, image: str, name: str) -> Self:
        """Pull ``image`` and run a sandbox whose container logs go to ``daemon.logs``."""
        await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
        config = sandbox_config(name, log_directory=daemon.logs)
        run = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        return cls(daemon, image, run.pod_sandbox_id, config)

    async def run_config(self, config: cri.ContainerConfig, *, wait_running: bool = False) -> str:
        """Create and start a container; optionally wait until it reports RUNNING."""
        container_id = await run_container(self.daemon.runtime, self.sandbox_id, self.config,
                                           config)
        if wait_running:
            await wait_for_state(self.daemon.runtime, container_id,
                                 cri.ContainerState.CONTAINER_RUNNING)
        return container_id

    async def run(self, name: str, script: str, *, wait_running: bool = False) -> str:
        """Run ``sh -c script`` in a container that logs to ``<name>.log``."""
        config = container_config(self.image, name, command=["sh", "-c", script],
                                  log_path=f"{name}.log")
        return await self.run_config(config, wait_running=wait_running)
