"""Records of pod sandboxes and containers as the daemon persists them.

Times are nanoseconds since the Unix epoch, the unit the CRI uses. States use the CRI's enum
names so a record reads the same in the database as in a ``crictl inspect``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

SANDBOX_READY = "SANDBOX_READY"
SANDBOX_NOTREADY = "SANDBOX_NOTREADY"

CONTAINER_CREATED = "CONTAINER_CREATED"
CONTAINER_RUNNING = "CONTAINER_RUNNING"
CONTAINER_EXITED = "CONTAINER_EXITED"
CONTAINER_UNKNOWN = "CONTAINER_UNKNOWN"


class Mount(BaseModel):
    container_path: str
    host_path: str
    readonly: bool = False
    propagation: str = "PROPAGATION_PRIVATE"
    selinux_relabel: bool = False


class SandboxRecord(BaseModel):
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int = 0
    state: str = SANDBOX_NOTREADY
    created_at: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    hostname: str = ""
    log_directory: str = ""
    runtime_handler: str = ""
    cgroup_parent: str = ""
    netns_path: str = ""
    #: CRI NamespaceMode names for network, pid and ipc, plus the target container for TARGET.
    namespace_modes: dict[str, str] = Field(default_factory=dict)
    infra_pid: int = 0
    #: The PodSandboxConfig exactly as kubelet sent it, encoded, for verbose status and restarts.
    config_b64: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def full_name(self) -> str:
        """Return the name that must be unique among sandboxes, as containerd reserves it."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"


class ContainerRecord(BaseModel):
    id: str
    sandbox_id: str
    name: str
    attempt: int = 0
    image_ref: str = ""
    image_id: str = ""
    state: str = CONTAINER_CREATED
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    log_path: str = ""
    mounts: list[Mount] = Field(default_factory=list)
    pid: int = 0
    runtime_handler: str = ""
    stop_signal: str = ""
    #: CRI LinuxContainerResources in proto JSON form as UpdateContainerResources last left
    #: them; empty means the resources of the ContainerConfig.
    resources: dict[str, Any] = Field(default_factory=dict)
    #: The ContainerConfig exactly as kubelet sent it, encoded, for verbose status.
    config_b64: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return f"{self.name}_{self.sandbox_id}_{self.attempt}"
