"""Reconciling the database with the machine when the daemon starts.

A sandbox or container that the database calls running is checked against the runtime: one
that still runs is adopted by a new shim, one that is gone is marked stopped. Runtime
containers, network namespaces and bundle directories that no record claims are leftovers of a
crash in the middle of a create or remove, and are cleaned up with a log line each.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from servin_shim.cri.context import now_ns
from servin_shim.oci import cgroups, rootfs
from servin_shim.oci import resources as ociresources
from servin_shim.oci.io import StreamPump
from servin_shim.oci.logs import CRILogWriter
from servin_shim.oci.shim import UNKNOWN_EXIT_CODE, ContainerShim
from servin_shim.state.records import (
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    ContainerRecord,
    SandboxRecord,
)

if TYPE_CHECKING:
    from servin_shim.cri.service import CRIService

log = logging.getLogger(__name__)

LIVE_STATES = ("running", "created", "paused")

#: Reason recorded for a container whose exit the daemon could not observe, as containerd does.
UNKNOWN_REASON = "Unknown"


async def recover(service: CRIService) -> None:
    """Adopt what still runs, record what ended, and remove what no record claims."""
    ctx = service.ctx
    sandboxes = ctx.metadata.sandboxes()
    containers = ctx.metadata.containers()
    for sandbox in sandboxes:
        if sandbox.state == SANDBOX_READY:
            await _recover_sandbox(service, sandbox)
    for container in containers:
        if container.state == CONTAINER_RUNNING:
            await _recover_container(service, container)
    await _clean_leftovers(service, {s.id for s in sandboxes}, {c.id for c in containers})


async def _recover_sandbox(service: CRIService, record: SandboxRecord) -> None:
    ctx = service.ctx
    runtime = ctx.runtime(record.runtime_handler)
    state = await runtime.state(record.id)
    if state is None or state.status != "running" or not state.pid:
        record.state = SANDBOX_NOTREADY
        ctx.metadata.save_sandbox(record)
        ctx.monitor.forget(record.id)
        log.warning("pod sandbox infra process is gone, marked not ready id=%s", record.id)
        return

    async def on_exit(code: int, finished_at: int) -> None:
        await service.sandboxes._infra_exited(record.id, code)

    volatile = ctx.paths.sandbox_state_dir(record.id)
    shim = ContainerShim(
        record.id, bundle=volatile / "bundle", io_dir=volatile / "io", log_path=None,
        runtime=runtime, monitor=ctx.monitor, on_exit=on_exit,
    )
    shim.adopt(state.pid)
    service.sandboxes.shims[record.id] = shim
    log.info("adopted running pod sandbox id=%s infra_pid=%d", record.id, state.pid)


async def _recover_container(service: CRIService, record: ContainerRecord) -> None:
    ctx = service.ctx
    containers = service.containers
    runtime = ctx.runtime(record.runtime_handler)
    state = await runtime.state(record.id)
    if state is not None and state.status in ("running", "paused") and state.pid:

        async def on_exit(code: int, finished_at: int) -> None:
            await containers._exited(record.id, code, finished_at)

        async def before_delete() -> None:
            await containers._capture_oom(record.id)

        state_dir = ctx.paths.container_state_dir(record.id)
        shim = ContainerShim(
            record.id, bundle=state_dir / "bundle", io_dir=state_dir / "io",
            log_path=Path(record.log_path) if record.log_path else None,
            runtime=runtime, monitor=ctx.monitor, on_exit=on_exit,
            before_delete=before_delete, log_rotation=ctx.log_rotation,
        )
        shim.adopt(state.pid)
        containers.shims[record.id] = shim
        log.info("adopted running container id=%s pid=%d", record.id, state.pid)
        return

    # The container exited while no daemon watched it. What it wrote meanwhile waits in its
    # FIFOs, and the monitor recorded its exit unless the monitor died too.
    _drain_output(record.id, ctx.paths.container_state_dir(record.id) / "io", record.log_path)
    recorded = ctx.monitor.recorded_exit(record.id)
    if recorded is not None:
        # The cgroup stays until the runtime deletes the container, so its OOM count is still
        # there to read.
        await containers._capture_oom(record.id)
        await containers._exited(record.id, *recorded)
        ctx.monitor.forget(record.id)
        log.info("container exited while the daemon was down id=%s exit_code=%d",
                 record.id, recorded[0])
    else:
        record.state = CONTAINER_EXITED
        record.exit_code = UNKNOWN_EXIT_CODE
        record.reason = UNKNOWN_REASON
        record.finished_at = record.finished_at or now_ns()
        ctx.metadata.save_container(record)
        log.warning("container exited while the daemon was down and no exit was recorded, "
                    "exit code unknown id=%s", record.id)
    await runtime.delete(record.id, force=True)


def _drain_output(container_id: str, io_dir: Path, log_path: str) -> None:
    """Copy the output still buffered in an exited container's FIFOs into its log."""
    if not (io_dir / "stdout").exists():
        return
    writer = CRILogWriter(Path(log_path) if log_path else Path(os.devnull))
    pump = StreamPump(container_id, io_dir, writer)
    pump.start(asyncio.get_running_loop())
    pump.close()


async def _clean_leftovers(service: CRIService, sandbox_ids: set[str], container_ids: set[str]) -> None:
    ctx = service.ctx
    known = sandbox_ids | container_ids
    for runtime in ctx.runtimes.values():
        for state in await runtime.list():
            if state.id not in known:
                await runtime.delete(state.id, force=True)
                log.warning("removed runtime container that no record claims id=%s runtime=%s",
                            state.id, runtime.name)
    exits = ctx.paths.state / "exits"
    if exits.exists():
        for path in exits.iterdir():
            if path.name not in known and not path.name.startswith("."):
                ctx.monitor.forget(path.name)
                log.warning("removed exit record that no container claims id=%s", path.name)
    for name in ctx.netns.list():
        if name not in sandbox_ids:
            ctx.netns.remove(name)
            log.warning("removed network namespace that no sandbox claims id=%s", name)
    for parent, ids, mounts in (
        (ctx.paths.state / "sandboxes", sandbox_ids, ("bundle/rootfs", "shm")),
        (ctx.paths.state / "containers", container_ids, ("bundle/rootfs",)),
    ):
        if not parent.exists():
            continue
        for directory in parent.iterdir():
            if directory.name in ids:
                continue
            for relative in mounts:
                rootfs.unmount(directory / relative)
            rootfs.remove_tree(directory)
            if parent.name == "sandboxes":
                # The pod cgroup that servin-shim creates when kubelet gives no parent.
                cgroups.remove_cgroup(ociresources.pod_cgroup_parent("", directory.name))
            log.warning("removed state directory that no record claims path=%s", directory)
    for parent, ids in (
        (ctx.paths.root / "sandboxes", sandbox_ids),
        (ctx.paths.root / "containers", container_ids),
    ):
        if not parent.exists():
            continue
        for directory in parent.iterdir():
            if directory.name not in ids:
                rootfs.remove_tree(directory)
                log.warning("removed directory that no record claims path=%s", directory)
