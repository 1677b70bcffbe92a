"""Container and pod statistics for ContainerStats, ListContainerStats and the pod variants.

kubelet builds its summary API (``kubectl top``, eviction decisions) from these, so the fields
follow the meaning kubelet gives them. ``usage_core_nano_seconds`` is cumulative CPU time and
``usage_nano_cores`` the rate since the previous sample. ``working_set_bytes`` is the memory
usage minus inactive file pages, and the writable layer is the container's overlay upper
directory.
Values come from the cgroup files (v1 controllers, or the unified v2 tree) and the filesystem.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from servin_shim.api.runtime import v1 as cri
from servin_shim.cri.context import RuntimeContext
from servin_shim.images.content import tree_usage
from servin_shim.oci import cgroups
from servin_shim.oci import resources as ociresources
from servin_shim.oci import spec as ocispec
from servin_shim.state.records import CONTAINER_RUNNING, ContainerRecord, SandboxRecord

log = logging.getLogger(__name__)

#: A memory limit at or above this is "no limit" (cgroup v1 reports the page-rounded maximum).
UNLIMITED_MEMORY = 1 << 62

#: Writable-layer sizes are cached this long (seconds), because walking a large upper directory
#: on every kubelet poll (about every 10 s) would cost more than the value is worth.
LAYER_USAGE_TTL = 10.0


@dataclass
class _CpuSample:
    timestamp: int
    usage: int


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """Parse a ``key value`` per line cgroup file such as memory.stat or cpu.stat."""
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
    except OSError:
        pass
    return values


def _u64(value: int | None) -> cri.UInt64Value | None:
    return cri.UInt64Value(value=max(value, 0)) if value is not None else None


class StatsCollector:
    """Reads usage from cgroups; keeps the previous CPU sample of each cgroup for rates."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self._cpu: dict[str, _CpuSample] = {}
        self._layers: dict[str, tuple[float, int, int]] = {}

    def _cpu_usage(self, key: str, cgroups_path: str) -> cri.CpuUsage | None:
        now = time.time_ns()
        if cgroups.is_unified():
            directory = cgroups.cgroup_dir(cgroups_path, "cpu")
            usec = _read_keyed(directory / "cpu.stat").get("usage_usec") if directory else None
            total = usec * 1000 if usec is not None else None
        else:
            directory = cgroups.cgroup_dir(cgroups_path, "cpuacct")
            total = _read_int(directory / "cpuacct.usage") if directory else None
        if total is None:
            return None
        nano_cores = None
        previous = self._cpu.get(key)
        if previous is not None and now > previous.timestamp and total >= previous.usage:
            nano_cores = (total - previous.usage) * 1_000_000_000 // (now - previous.timestamp)
        self._cpu[key] = _CpuSample(now, total)
        return cri.CpuUsage(
            timestamp=now,
            usage_core_nano_seconds=_u64(total),
            usage_nano_cores=_u64(nano_cores),
        )

    def _memory_usage(self, cgroups_path: str) -> cri.MemoryUsage | None:
        now = time.time_ns()
        directory = cgroups.cgroup_dir(cgroups_path, "memory")
        if directory is None:
            return None
        stat = _read_keyed(directory / "memory.stat")
        if cgroups.is_unified():
            usage = _read_int(directory / "memory.current")
            limit_text = _read_text(directory / "memory.max")
            limit = None if limit_text in (None, "max") else int(limit_text)
            inactive_file = stat.get("inactive_file", 0)
            rss = stat.get("anon")
        else:
            usage = _read_int(directory / "memory.usage_in_bytes")
            limit = _read_int(directory / "memory.limit_in_bytes")
            inactive_file = stat.get("total_inactive_file", 0)
            rss = stat.get("total_rss")
        if usage is None:
            return None
        working_set = max(usage - inactive_file, 0)
        available = None
        if limit is not None and limit < UNLIMITED_MEMORY:
            available = max(limit - working_set, 0)
        return cri.MemoryUsage(
            timestamp=now,
            working_set_bytes=_u64(working_set),
            available_bytes=_u64(available),
            usage_bytes=_u64(usage),
            rss_bytes=_u64(rss),
            page_faults=_u64(stat.get("pgfault", stat.get("total_pgfault"))),
            major_page_faults=_u64(stat.get("pgmajfault", stat.get("total_pgmajfault"))),
        )

    async def _writable_layer(self, record: ContainerRecord) -> cri.FilesystemUsage:
        upper = self.ctx.paths.container_dir(record.id) / "upper"
        now = time.monotonic()
        cached = self._layers.get(record.id)
        if cached is None or now - cached[0] > LAYER_USAGE_TTL:
            usage = await asyncio.to_thread(tree_usage, upper)
            cached = (now, usage.used_bytes, usage.inodes_used)
            self._layers[record.id] = cached
        return cri.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=cri.FilesystemIdentifier(mountpoint=str(self.ctx.paths.root)),
            used_bytes=_u64(cached[1]),
            inodes_used=_u64(cached[2]),
        )

    def _container_cgroup(self, record: ContainerRecord) -> str:
        bundle = self.ctx.paths.container_state_dir(record.id) / "bundle"
        try:
            return str(ocispec.read_spec(bundle).get("linux", {}).get("cgroupsPath", ""))
        except (OSError, ValueError):
            return ""

    async def container(self, record: ContainerRecord) -> cri.ContainerStats:
        stats = cri.ContainerStats(
            attributes=cri.ContainerAttributes(
                id=record.id,
                metadata=cri.ContainerMetadata(name=record.name, attempt=record.attempt),
                labels=dict(record.labels),
                annotations=dict(record.annotations),
            ),
            writable_layer=await self._writable_layer(record),
        )
        if record.state == CONTAINER_RUNNING:
            cgroups_path = self._container_cgroup(record)
            if cgroups_path:
                stats.cpu = self._cpu_usage(record.id, cgroups_path)
                stats.memory = self._memory_usage(cgroups_path)
        return stats

    async def sandbox(self, record: SandboxRecord) -> cri.PodSandboxStats:
        containers = [
            c for c in self.ctx.metadata.containers(record.id) if c.state == CONTAINER_RUNNING
        ]
        container_stats = [await self.container(c) for c in containers]
        linux = cri.LinuxPodSandboxStats(containers=container_stats)
        parent = pod_cgroup(record)
        if parent:
            linux.cpu = self._cpu_usage(f"pod:{record.id}", parent)
            linux.memory = self._memory_usage(parent)
            pids_dir = cgroups.cgroup_dir(parent, "pids")
            count = _read_int(pids_dir / "pids.current") if pids_dir else None
            linux.process = cri.ProcessUsage(timestamp=time.time_ns(),
                                             process_count=_u64(count))
        return cri.PodSandboxStats(
            attributes=cri.PodSandboxAttributes(
                id=record.id,
                metadata=cri.PodSandboxMetadata(name=record.name, uid=record.uid,
                                                namespace=record.namespace,
                                                attempt=record.attempt),
                labels=dict(record.labels),
                annotations=dict(record.annotations),
            ),
            linux=linux,
        )

    def forget(self, object_id: str) -> None:
        """Drop cached samples of a removed container or pod."""
        self._cpu.pop(object_id, None)
        self._cpu.pop(f"pod:{object_id}", None)
        self._layers.pop(object_id, None)


def pod_cgroup(record: SandboxRecord) -> str:
    """Return the cgroupfs path that contains every process of a pod; "" for a systemd slice."""
    parent = ociresources.pod_cgroup_parent(record.cgroup_parent, record.id)
    return parent.rstrip("/") if parent.startswith("/") else ""


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
