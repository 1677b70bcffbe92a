"""Turning our records into CRI messages."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

from servin_shim.api.runtime import v1 as cri
from servin_shim.state.records import ContainerRecord, SandboxRecord

if TYPE_CHECKING:
    from servin_shim.images.store import ImageRecord


def sandbox_config(record: SandboxRecord) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig.parse(base64.b64decode(record.config_b64))


def container_config(record: ContainerRecord) -> cri.ContainerConfig:
    return cri.ContainerConfig.parse(base64.b64decode(record.config_b64))


def sandbox_metadata(record: SandboxRecord) -> cri.PodSandboxMetadata:
    return cri.PodSandboxMetadata(
        name=record.name, uid=record.uid, namespace=record.namespace, attempt=record.attempt
    )


def pod_sandbox(record: SandboxRecord) -> cri.PodSandbox:
    return cri.PodSandbox(
        id=record.id,
        metadata=sandbox_metadata(record),
        state=cri.PodSandboxState[record.state],
        created_at=record.created_at,
        labels=dict(record.labels),
        annotations=dict(record.annotations),
        runtime_handler=record.runtime_handler,
    )


def pod_sandbox_status(record: SandboxRecord) -> cri.PodSandboxStatus:
    modes = record.namespace_modes
    return cri.PodSandboxStatus(
        id=record.id,
        metadata=sandbox_metadata(record),
        state=cri.PodSandboxState[record.state],
        created_at=record.created_at,
        network=cri.PodSandboxNetworkStatus(ip=""),
        linux=cri.LinuxPodSandboxStatus(
            namespaces=cri.Namespace(
                options=cri.NamespaceOption(
                    network=cri.NamespaceMode[modes.get("network", "POD")],
                    pid=cri.NamespaceMode[modes.get("pid", "CONTAINER")],
                    ipc=cri.NamespaceMode[modes.get("ipc", "POD")],
                    target_id=modes.get("target_id", ""),
                )
            )
        ),
        labels=dict(record.labels),
        annotations=dict(record.annotations),
        runtime_handler=record.runtime_handler,
    )


def container_metadata(record: ContainerRecord) -> cri.ContainerMetadata:
    return cri.ContainerMetadata(name=record.name, attempt=record.attempt)


def container(record: ContainerRecord) -> cri.Container:
    return cri.Container(
        id=record.id,
        pod_sandbox_id=record.sandbox_id,
        metadata=container_metadata(record),
        image=cri.ImageSpec(image=record.image_ref),
        image_ref=record.image_id,
        image_id=record.image_id,
        state=cri.ContainerState[record.state],
        created_at=record.created_at,
        labels=dict(record.labels),
        annotations=dict(record.annotations),
    )


def container_status(record: ContainerRecord) -> cri.ContainerStatus:
    resources = container_resources(record)
    return cri.ContainerStatus(
        id=record.id,
        metadata=container_metadata(record),
        state=cri.ContainerState[record.state],
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        exit_code=record.exit_code,
        image=cri.ImageSpec(image=record.image_ref),
        image_ref=record.image_id,
        image_id=record.image_id,
        reason=record.reason,
        message=record.message,
        labels=dict(record.labels),
        annotations=dict(record.annotations),
        mounts=[
            cri.Mount(
                container_path=m.container_path,
                host_path=m.host_path,
                readonly=m.readonly,
                selinux_relabel=m.selinux_relabel,
                propagation=cri.MountPropagation[m.propagation],
            )
            for m in record.mounts
        ],
        log_path=record.log_path,
        resources=cri.ContainerResources(linux=resources) if resources else None,
    )


def container_resources(record: ContainerRecord) -> cri.LinuxContainerResources | None:
    """Return the container's current Linux resources: the last update, else its config's."""
    if record.resources:
        return cri.LinuxContainerResources.from_dict(record.resources)
    if not record.config_b64:
        return None
    config = container_config(record)
    return config.linux.resources if config.linux else None


def container_info(record: ContainerRecord) -> dict[str, str]:
    """Return the verbose ``info`` map of ContainerStatus: our record as JSON."""
    data = record.model_dump(exclude={"config_b64"})
    return {"info": json.dumps(data)}


def sandbox_info(record: SandboxRecord) -> dict[str, str]:
    data = record.model_dump(exclude={"config_b64"})
    return {"info": json.dumps(data)}


def image(record: ImageRecord) -> cri.Image:
    uid = record.uid
    return cri.Image(
        id=record.id,
        repo_tags=list(record.repo_tags),
        repo_digests=list(record.repo_digests),
        size=record.size,
        uid=cri.Int64Value(value=uid) if uid is not None else None,
        username=record.username,
        spec=cri.ImageSpec(image=record.id),
        pinned=record.pinned,
    )
