"""Everything the CRI operations share: paths, the database, the reaper and the runtimes."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from servin_shim.config.models import Spec
from servin_shim.errors import InvalidArgument
from servin_shim.network.netns import NetworkNamespaces
from servin_shim.oci.logs import LogRotation
from servin_shim.oci.monitor_client import MonitorClient
from servin_shim.oci.reaper import Reaper
from servin_shim.oci.runtime import OCIRuntime
from servin_shim.state.metadata import MetadataStore

if TYPE_CHECKING:
    from servin_shim.images.service import ImageService


def new_id() -> str:
    """Return a fresh 64-hex-digit id, the form containerd and CRI-O use."""
    return secrets.token_hex(32)


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Paths:
    """The daemon's directories: ``root`` survives reboots, ``state`` lives on tmpfs."""

    root: Path
    state: Path

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """Persistent files of a pod: hostname, hosts and resolv.conf."""
        return self.root / "sandboxes" / sandbox_id

    def sandbox_state_dir(self, sandbox_id: str) -> Path:
        """Volatile files of a pod: the infra bundle and the /dev/shm mount."""
        return self.state / "sandboxes" / sandbox_id

    def container_dir(self, container_id: str) -> Path:
        """Persistent files of a container: its overlay upper and work directories."""
        return self.root / "containers" / container_id

    def container_state_dir(self, container_id: str) -> Path:
        """Volatile files of a container: the bundle, its rootfs mount and the stdio FIFOs."""
        return self.state / "containers" / container_id


@dataclass
class RuntimeContext:
    paths: Paths
    metadata: MetadataStore
    reaper: Reaper
    monitor: MonitorClient
    netns: NetworkNamespaces
    images: ImageService
    runtimes: dict[str, OCIRuntime]
    default_handler: str
    #: The infra image; empty means the built-in catatonit infra with no image.
    sandbox_image: str = ""
    catatonit: str = "/usr/bin/catatonit"
    #: The ``spec`` section of the daemon configuration: security and resource defaults.
    config: Spec = field(default_factory=Spec)
    #: Rotation of container logs by the daemon, from ``container.logMaxSize``/``logMaxFiles``.
    log_rotation: LogRotation = field(default_factory=LogRotation)
    locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )

    def runtime(self, handler: str) -> OCIRuntime:
        """Return the runtime for a CRI ``runtime_handler`` ("" means the default)."""
        name = handler or self.default_handler
        try:
            return self.runtimes[name]
        except KeyError:
            known = ", ".join(sorted(self.runtimes)) or "none"
            raise InvalidArgument(
                f"unknown runtime handler {handler!r}: configured handlers are {known}"
            ) from None

    def lock(self, object_id: str) -> asyncio.Lock:
        """Return the lock that serialises operations on one sandbox or container."""
        return self.locks[object_id]
