"""Containers: CreateContainer, StartContainer, StopContainer, RemoveContainer and their state.

CreateContainer prepares the bundle (config.json and an overlay root filesystem) and records
the container as CREATED; StartContainer runs ``runtime create`` and ``runtime start`` through a
shim, as containerd's CRI plugin does, so a created container holds no process.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from servin_shim.api.runtime import v1 as cri
from servin_shim.config.models import ResourcesConfig
from servin_shim.cri import convert
from servin_shim.cri.container_spec import build_container_spec, ensure_workdir, parse_signal
from servin_shim.cri.context import RuntimeContext, new_id, now_ns
from servin_shim.cri.exec import ExecResult, exec_sync
from servin_shim.errors import FailedPrecondition, InvalidArgument, NotFound, ServinError
from servin_shim.oci import cgroups, rootfs
from servin_shim.oci import resources as ociresources
from servin_shim.oci import spec as ocispec
from servin_shim.oci.runtime import OCIRuntimeError
from servin_shim.oci.shim import ContainerShim
from servin_shim.state.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    SANDBOX_READY,
    ContainerRecord,
    Mount,
    SandboxRecord,
)

log = logging.getLogger(__name__)

#: Exit code and reason recorded for a container whose start failed, as containerd records them.
START_ERROR_EXIT_CODE = 128
START_ERROR_REASON = "StartError"
#: Exit reason of a container whose cgroup saw an OOM kill; kubelet matches this exact text.
OOM_KILLED_REASON = "OOMKilled"
#: How long a container gets to exit after a SIGKILL sent without the runtime.
DIRECT_KILL_WAIT = 10.0


def check_resource_values(resources: cri.LinuxContainerResources) -> None:
    """Reject negative limits, which cgroups would reject or read as something else."""
    for field in ("cpu_period", "cpu_shares", "memory_limit_in_bytes"):
        value = getattr(resources, field)
        if value < 0:
            raise InvalidArgument(f"invalid {field} {value}: it must be 0 (unset) or positive")
    # -1 is the cgroup's own "no limit" for these two.
    for field in ("cpu_quota", "memory_swap_limit_in_bytes"):
        value = getattr(resources, field)
        if value < -1:
            raise InvalidArgument(
                f"invalid {field} {value}: it must be -1 (no limit), 0 (unset) or positive"
            )
    if not -1000 <= resources.oom_score_adj <= 1000:
        raise InvalidArgument(
            f"invalid oom_score_adj {resources.oom_score_adj}: it must be from -1000 to 1000"
        )


def stop_signal(record: ContainerRecord) -> int:
    """Return the signal that stops a container gracefully; SIGTERM if the recorded one is bad.

    CreateContainer rejects a bad image StopSignal, but records written before that check may
    hold one, and a bad signal must not make the container unstoppable.
    """
    try:
        return parse_signal(record.stop_signal)
    except InvalidArgument:
        log.warning("invalid stop signal %r recorded for container id=%s, using SIGTERM",
                    record.stop_signal, record.id)
        return signal.SIGTERM


class ContainerManager:
    """Creates, starts, stops and removes containers; ``shims`` maps container id to its shim."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self.shims: dict[str, ContainerShim] = {}
        #: Containers whose cgroup saw an OOM kill, noted between their exit and its record.
        self._oom_killed: set[str] = set()

    # CreateContainer

    async def create(
        self, sandbox_id: str, config: cri.ContainerConfig | None,
        sandbox_config: cri.PodSandboxConfig | None,
    ) -> str:
        ctx = self.ctx
        if config is None or config.metadata is None or not config.metadata.name:
            raise InvalidArgument("container config has no metadata.name: a name is required")
        if config.image is None or not config.image.image:
            raise InvalidArgument(
                f"container {config.metadata.name!r} has no image: set config.image.image"
            )
        if config.linux is not None and config.linux.resources is not None:
            check_resource_values(config.linux.resources)
        sandbox = ctx.metadata.get_sandbox(sandbox_id)
        if sandbox.state != SANDBOX_READY:
            raise FailedPrecondition(
                f"pod sandbox {sandbox_id} is not ready: create a new sandbox for this pod"
            )
        image = ctx.images.status(config.image.image, strict=True)
        if image is None:
            raise NotFound(
                f"image {config.image.image!r} not found: pull it before creating container "
                f"{config.metadata.name!r}"
            )
        image_config: dict[str, Any] = ctx.images.config(image.id).get("config") or {}
        image_stop_signal = str(image_config.get("StopSignal") or "")
        try:
            parse_signal(image_stop_signal)
        except InvalidArgument:
            raise InvalidArgument(
                f"image {config.image.image!r} has an invalid StopSignal "
                f"{image_stop_signal!r}: fix the image's STOPSIGNAL, for example SIGTERM"
            ) from None

        log_path = ""
        if sandbox.log_directory and config.log_path:
            log_path = str(Path(sandbox.log_directory) / config.log_path)
        record = ContainerRecord(
            id=new_id(),
            sandbox_id=sandbox.id,
            name=config.metadata.name,
            attempt=config.metadata.attempt,
            image_ref=config.image.image,
            image_id=image.id,
            created_at=now_ns(),
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            log_path=log_path,
            mounts=[
                Mount(
                    container_path=m.container_path,
                    host_path=m.host_path,
                    readonly=m.readonly,
                    propagation=cri.MountPropagation(m.propagation).name,
                    selinux_relabel=m.selinux_relabel,
                )
                for m in config.mounts
            ],
            runtime_handler=sandbox.runtime_handler,
            stop_signal=image_stop_signal,
            config_b64=base64.b64encode(bytes(config)).decode(),
            # The container's rootfs needs these layers even if its image is removed.
            extra={"chain_ids": list(image.chain_ids)},
        )
        ctx.metadata.add_container(record)
        async with ctx.lock(record.id):
            try:
                await self._prepare_bundle(record, sandbox, config, image_config, image.id)
            except BaseException as exc:
                log.error("failed to create container id=%s name=%s sandbox=%s: %s",
                          record.id, record.name, sandbox.id, exc)
                self._discard(record.id)
                raise
        log.info("created container id=%s name=%s sandbox=%s image=%s",
                 record.id, record.name, sandbox.id, record.image_ref)
        return record.id

    async def _prepare_bundle(
        self, record: ContainerRecord, sandbox: SandboxRecord, config: cri.ContainerConfig,
        image_config: dict[str, Any], image_id: str,
    ) -> None:
        ctx = self.ctx
        bundle = ctx.paths.container_state_dir(record.id) / "bundle"
        root = bundle / "rootfs"
        persistent = ctx.paths.container_dir(record.id)
        rootfs.mount_overlay(
            ctx.images.rootfs_layers(image_id), persistent / "upper", persistent / "work", root
        )

        def target_pid(container_id: str) -> int:
            # A TARGET container joins the pid namespace of a running container of the pod.
            target = ctx.metadata.get_container(container_id)
            if target.state != CONTAINER_RUNNING or not target.pid:
                raise FailedPrecondition(
                    f"target container {container_id} is {target.state}: the pid namespace "
                    "target must be running"
                )
            return target.pid

        spec = build_container_spec(
            ctx.paths, record, sandbox, config, image_config, root,
            settings=ctx.config, target_pid=target_pid,
        )
        user = spec["process"]["user"]
        ensure_workdir(root, spec["process"]["cwd"], user["uid"], user["gid"])
        ocispec.write_spec(bundle, spec)

    def _discard(self, container_id: str) -> None:
        """Undo a failed CreateContainer; failures are logged so the create error is reported."""
        try:
            self._release_bundle(container_id)
        except Exception:
            log.exception("failed to release bundle of failed container id=%s", container_id)
        try:
            self.ctx.metadata.delete_container(container_id)
        except Exception:
            log.exception("failed to delete record of failed container id=%s", container_id)
        self.ctx.locks.pop(container_id, None)

    def _release_bundle(self, container_id: str) -> None:
        """Unmount and delete a container's bundle and overlay directories."""
        state = self.ctx.paths.container_state_dir(container_id)
        rootfs.unmount(state / "bundle" / "rootfs")
        rootfs.remove_tree(state)
        rootfs.remove_tree(self.ctx.paths.container_dir(container_id))

    # StartContainer

    async def start(self, container_id: str) -> None:
        ctx = self.ctx
        record = ctx.metadata.get_container(container_id)
        async with ctx.lock(record.id):
            record = ctx.metadata.get_container(container_id)
            if record.state != CONTAINER_CREATED:
                raise FailedPrecondition(
                    f"container {container_id} is {record.state}, only a CONTAINER_CREATED "
                    "container can be started"
                )
            sandbox = ctx.metadata.get_sandbox(record.sandbox_id)
            if sandbox.state != SANDBOX_READY:
                raise FailedPrecondition(
                    f"pod sandbox {sandbox.id} of container {container_id} is not ready"
                )
            state_dir = ctx.paths.container_state_dir(record.id)
            shim = ContainerShim(
                record.id,
                bundle=state_dir / "bundle",
                io_dir=state_dir / "io",
                log_path=Path(record.log_path) if record.log_path else None,
                runtime=ctx.runtime(record.runtime_handler),
                monitor=ctx.monitor,
                on_exit=lambda code, at: self._exited(container_id, code, at),
                before_delete=lambda: self._capture_oom(container_id),
                log_rotation=ctx.log_rotation,
            )
            try:
                record.pid = await shim.start()
            except Exception as exc:
                record.state = CONTAINER_EXITED
                record.finished_at = now_ns()
                record.exit_code = START_ERROR_EXIT_CODE
                record.reason = START_ERROR_REASON
                record.message = str(exc)
                ctx.metadata.save_container(record)
                log.error("failed to start container id=%s: %s", record.id, exc)
                raise
            self.shims[record.id] = shim
            # The exit callback may already have run for a container that exits at once.
            latest = ctx.metadata.get_container(record.id)
            if latest.state == CONTAINER_CREATED:
                record.state = CONTAINER_RUNNING
                record.started_at = shim.started_at
                ctx.metadata.save_container(record)
            else:
                latest.pid = record.pid
                latest.started_at = min(shim.started_at, latest.finished_at)
                ctx.metadata.save_container(latest)
        log.info("started container id=%s pid=%d", record.id, record.pid)

    async def _exited(self, container_id: str, code: int, finished_at: int) -> None:
        try:
            record = self.ctx.metadata.get_container(container_id)
        except NotFound:
            return
        if record.state == CONTAINER_EXITED:
            return
        if not record.started_at:
            record.started_at = finished_at
        record.state = CONTAINER_EXITED
        record.exit_code = code
        record.finished_at = finished_at
        if container_id in self._oom_killed:
            # Any OOM kill in the container's cgroup counts, as containerd and CRI-O report it.
            record.reason = OOM_KILLED_REASON
        else:
            record.reason = "Completed" if code == 0 else "Error"
        self._oom_killed.discard(container_id)
        self.ctx.metadata.save_container(record)
        self.shims.pop(container_id, None)
        log.info("container exited id=%s exit_code=%d reason=%s",
                 container_id, code, record.reason)

    async def _capture_oom(self, container_id: str) -> None:
        """Note an OOM kill in the container's cgroup before ``runtime delete`` removes it."""
        bundle = self.ctx.paths.container_state_dir(container_id) / "bundle"
        try:
            cgroups_path = ocispec.read_spec(bundle).get("linux", {}).get("cgroupsPath", "")
        except (OSError, ValueError) as exc:
            log.warning("cannot read cgroupsPath of container id=%s: %s", container_id, exc)
            return
        kills = cgroups.oom_kill_count(cgroups_path)
        if kills:
            log.info("container had OOM kills id=%s oom_kills=%d", container_id, kills)
            self._oom_killed.add(container_id)

    # StopContainer and RemoveContainer

    async def stop(self, container_id: str, timeout: int) -> None:
        """Stop a container; an exited or unknown one is already stopped, as the CRI wants."""
        try:
            record = self.ctx.metadata.get_container(container_id)
        except NotFound:
            log.debug("stop of unknown container id=%s, nothing to do", container_id)
            return
        shim = self.shims.get(record.id)
        if record.state != CONTAINER_RUNNING or shim is None:
            return
        log.info("stopping container id=%s timeout=%ds", record.id, timeout)
        # A timeout of 0 kills at once, so the stop signal is not even looked at.
        sig = stop_signal(record) if timeout > 0 else signal.SIGKILL
        try:
            await shim.stop(max(timeout, 0), sig)
        except (ServinError, OSError) as exc:
            if not shim.running:
                return
            # The shim's pid is the live container until the exit monitor reports its exit.
            log.warning("runtime failed to stop container, sending SIGKILL directly id=%s "
                        "pid=%d: %s", record.id, shim.pid, exc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(shim.pid, signal.SIGKILL)
            if not await shim.wait(DIRECT_KILL_WAIT):
                raise ServinError(
                    f"container {record.id} (pid {shim.pid}) did not exit after SIGKILL: {exc}"
                ) from exc

    # ExecSync and UpdateContainerResources

    async def exec_sync(self, container_id: str, command: list[str], timeout: int) -> ExecResult:
        """Run ``command`` in a running container; ``timeout`` in seconds, 0 for none."""
        if not command:
            raise InvalidArgument("ExecSync needs cmd, the command to run")
        record = self.resolve(container_id)
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(
                f"container {record.id} is {record.state}: exec needs a running container"
            )
        return await exec_sync(
            self.ctx.runtime(record.runtime_handler),
            self.ctx.reaper,
            record.id,
            command,
            work_dir=self.ctx.paths.container_state_dir(record.id) / "exec",
            timeout=max(timeout, 0),
        )

    async def update_resources(
        self, container_id: str, resources: cri.LinuxContainerResources | None
    ) -> None:
        """Apply new limits to a created or running container and keep them in its record.

        Fields left zero keep their current value. The bundle's config.json is updated too,
        so a created container starts with the new limits.
        """
        ctx = self.ctx
        record = self.resolve(container_id)
        if resources is None:
            log.debug("update without linux resources id=%s, nothing to do", record.id)
            return
        check_resource_values(resources)
        async with ctx.lock(record.id):
            record = ctx.metadata.get_container(record.id)
            if record.state not in (CONTAINER_CREATED, CONTAINER_RUNNING):
                raise FailedPrecondition(
                    f"container {record.id} is {record.state}: only a created or running "
                    "container can have its resources updated"
                )
            # The same conversion as at create, but without the daemon's configured defaults,
            # which applied at create already: an update changes only what it sets.
            oci_resources, _ = ociresources.linux_resources(
                resources, ResourcesConfig(), container_id=record.id
            )
            if record.state == CONTAINER_RUNNING:
                try:
                    await ctx.runtime(record.runtime_handler).update(record.id, oci_resources)
                except OCIRuntimeError as exc:
                    if ctx.metadata.get_container(record.id).state != CONTAINER_RUNNING:
                        raise FailedPrecondition(
                            f"container {record.id} exited during the resource update"
                        ) from exc
                    raise
            bundle = ctx.paths.container_state_dir(record.id) / "bundle"
            spec = ocispec.read_spec(bundle)
            spec_resources = spec.setdefault("linux", {}).setdefault("resources", {})
            for key, value in oci_resources.items():
                if isinstance(value, dict):
                    spec_resources.setdefault(key, {}).update(value)
                else:
                    spec_resources[key] = value
            ocispec.write_spec(bundle, spec)
            merged = cgroups.merge_cri_resources(convert.container_resources(record), resources)
            record = ctx.metadata.get_container(record.id)
            record.resources = merged.to_dict()
            ctx.metadata.save_container(record)
        log.info("updated container resources id=%s resources=%s", record.id, oci_resources)

    async def remove(self, container_id: str) -> None:
        """Remove a container, killing it first if it still runs; unknown ids succeed."""
        try:
            record = self.ctx.metadata.get_container(container_id)
        except NotFound:
            log.debug("remove of unknown container id=%s, nothing to do", container_id)
            return
        if record.state == CONTAINER_RUNNING:
            await self.stop(record.id, 0)
        async with self.ctx.lock(record.id):
            try:
                await self.ctx.runtime(record.runtime_handler).delete(record.id, force=True)
            except (ServinError, OSError) as exc:
                # The process is gone (stopped above) or never ran, so only runtime state
                # can be left behind, and it must not keep the container unremovable.
                log.warning("failed to delete runtime state of container id=%s handler=%s: %s",
                            record.id, record.runtime_handler, exc)
            self._release_bundle(record.id)
            self.ctx.metadata.delete_container(record.id)
        self.ctx.locks.pop(record.id, None)
        if self.ctx.images.status(record.image_id) is None:
            # Its image was removed while it ran: the layers only it used can go now.
            self.ctx.images.collect_snapshots()
        log.info("removed container id=%s", record.id)

    async def stop_all(self, sandbox_id: str) -> None:
        for record in self.ctx.metadata.containers(sandbox_id):
            await self.stop(record.id, 0)

    async def remove_all(self, sandbox_id: str) -> None:
        for record in self.ctx.metadata.containers(sandbox_id):
            await self.remove(record.id)

    def resolve(self, id_or_prefix: str) -> ContainerRecord:
        """Find a container by full id or unique id prefix, as crictl allows."""
        if not id_or_prefix:
            raise InvalidArgument("container id is empty")
        try:
            return self.ctx.metadata.get_container(id_or_prefix)
        except NotFound:
            matches = [c for c in self.ctx.metadata.containers() if c.id.startswith(id_or_prefix)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(
                    f"container id prefix {id_or_prefix!r} is ambiguous: it matches "
                    f"{len(matches)} containers"
                ) from None
            raise
