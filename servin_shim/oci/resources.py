"""Container resource limits in the OCI spec: CPU, cpuset, memory and swap, hugepages, the
cgroup v2 ``unified`` map, the OOM score adjustment and the cgroups path.

Values come from the CRI LinuxContainerResources. ``spec.resources`` of the daemon
configuration fills in what the request leaves unset.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from servin_shim.api.runtime import v1 as cri
from servin_shim.config.models import ResourcesConfig
from servin_shim.errors import InvalidArgument

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Parent of the cgroups of pods whose sandbox config names no cgroup_parent.
DEFAULT_CGROUP_PARENT = "/servin"
#: Prefix of the systemd scope units runc creates, as in ``<slice>:servin:<id>``.
SYSTEMD_SCOPE_PREFIX = "servin"

_PAGE_SIZE = re.compile(r"(\d+)([KMGT]B)")
_PAGE_UNITS = {"KB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}


def cgroup_v2_unified() -> bool:
    """Return True on a pure cgroup v2 host, where runc uses the unified hierarchy only."""
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def swap_accounting() -> bool:
    if cgroup_v2_unified():
        return True
    return (CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists()


def hugetlb_available() -> bool:
    """Return True when runc can set hugepage limits: a v1 hugetlb hierarchy or v2 hugetlb."""
    if cgroup_v2_unified():
        try:
            return "hugetlb" in (CGROUP_ROOT / "cgroup.controllers").read_text().split()
        except OSError:
            return False
    return (CGROUP_ROOT / "hugetlb").is_dir()


def supported_page_sizes() -> set[str]:
    """Return the hugepage sizes of this kernel in the CRI's form (``2MB``, ``1GB``)."""
    sizes = set()
    for path in Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB"):
        kilobytes = int(path.name.removeprefix("hugepages-").removesuffix("kB"))
        for unit in ("TB", "GB", "MB", "KB"):
            if kilobytes % _PAGE_UNITS[unit] == 0:
                sizes.add(f"{kilobytes // _PAGE_UNITS[unit]}{unit}")
                break
    return sizes


def cgroups_path(parent: str, name: str) -> str:
    """Return linux.cgroupsPath for cgroup ``name`` under ``parent``.

    A parent ending in ``.slice`` selects runc's systemd driver form ``slice:prefix:name``. Any
    other parent is a cgroupfs path, and an empty parent means ``/servin``.
    """
    if parent.endswith(".slice"):
        return f"{parent}:{SYSTEMD_SCOPE_PREFIX}:{name}"
    base = parent.rstrip("/") if parent else DEFAULT_CGROUP_PARENT
    if not base.startswith("/"):
        base = "/" + base
    return f"{base}/{name}"


def pod_cgroup_parent(cgroup_parent: str, sandbox_id: str) -> str:
    """Return the cgroup that contains every process of a pod, infra and containers alike.

    kubelet passes one per pod. Without it, the pod gets ``/servin/<sandbox id>``, so the infra
    and the containers are siblings below one pod cgroup, as under kubelet's parent.
    """
    return cgroup_parent or f"{DEFAULT_CGROUP_PARENT}/{sandbox_id}"


def daemon_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return -1000


def clamp_oom_score_adj(value: int, *, container_id: str) -> int:
    """Raise ``value`` to the daemon's own score when it is lower.

    Lowering the score below the parent's needs CAP_SYS_RESOURCE, which the daemon may lack, and
    runc then fails the whole create.
    """
    value = max(-1000, min(1000, value))
    floor = daemon_oom_score_adj()
    if value < floor:
        log.info("raising oom_score_adj to the daemon's own value container=%s requested=%d "
                 "applied=%d", container_id, value, floor)
        return floor
    return value


def linux_resources(
    resources: cri.LinuxContainerResources | None, config: ResourcesConfig, *, container_id: str
) -> tuple[dict[str, Any], int]:
    """Return the OCI linux.resources fields (without devices) and the process oomScoreAdj."""
    out: dict[str, Any] = {}
    cpu = _cpu(resources, config)
    if cpu:
        out["cpu"] = cpu
    memory = _memory(resources, config, container_id=container_id)
    if memory:
        out["memory"] = memory
    if resources is not None and resources.hugepage_limits:
        limits = _hugepages(resources.hugepage_limits, container_id=container_id)
        if limits:
            out["hugepageLimits"] = limits
    if resources is not None and resources.unified:
        if not cgroup_v2_unified():
            raise InvalidArgument(
                f"unified cgroup settings {sorted(resources.unified)} need a cgroup v2 host, "
                "but this node uses cgroup v1: remove them from the container resources"
            )
        out["unified"] = dict(resources.unified)
    oom = resources.oom_score_adj if resources is not None else config.oom_score_adj
    return out, clamp_oom_score_adj(oom, container_id=container_id)


def _cpu(resources: cri.LinuxContainerResources | None, config: ResourcesConfig) -> dict[str, Any]:
    cpu: dict[str, Any] = {}
    quota = resources.cpu_quota if resources is not None and resources.cpu_quota > 0 else 0
    period = resources.cpu_period if resources is not None and resources.cpu_period > 0 else 0
    if not quota and config.cpu_cfs_quota:
        quota = config.cpu_cfs_quota
    if quota:
        cpu["quota"] = quota
        cpu["period"] = period or config.cpu_cfs_period
    elif period:
        cpu["period"] = period
    if resources is None:
        return cpu
    if resources.cpu_shares > 0:
        cpu["shares"] = resources.cpu_shares
    if resources.cpuset_cpus:
        cpu["cpus"] = resources.cpuset_cpus
    if resources.cpuset_mems:
        cpu["mems"] = resources.cpuset_mems
    return cpu


def _memory(
    resources: cri.LinuxContainerResources | None, config: ResourcesConfig, *, container_id: str
) -> dict[str, Any]:
    limit = resources.memory_limit_in_bytes if resources is not None else 0
    swap = resources.memory_swap_limit_in_bytes if resources is not None else 0
    if limit <= 0:
        if swap > 0:
            log.warning("ignoring memory_swap_limit_in_bytes without a memory limit "
                        "container=%s swap=%d", container_id, swap)
        return {}
    memory: dict[str, Any] = {"limit": limit}
    if not swap_accounting():
        return memory
    if swap <= 0:
        # OCI swap is memory plus swap, so swap == limit means no swap, as containerd sets it.
        swap = max(config.memory_swap, limit)
    if swap < limit:
        raise InvalidArgument(
            f"memory_swap_limit_in_bytes {swap} is below memory_limit_in_bytes {limit}: the swap "
            "limit counts memory plus swap, so it must be at least the memory limit"
        )
    memory["swap"] = swap
    return memory


def _hugepages(
    limits: list[cri.HugepageLimit], *, container_id: str
) -> list[dict[str, Any]]:
    if not hugetlb_available():
        log.warning("ignoring hugepage limits: the hugetlb cgroup controller is not available to "
                    "runc on this node container=%s", container_id)
        return []
    supported = supported_page_sizes()
    out = []
    for item in limits:
        if not _PAGE_SIZE.fullmatch(item.page_size) or item.page_size not in supported:
            raise InvalidArgument(
                f"invalid hugepage size {item.page_size!r}: this node supports "
                f"{sorted(supported) or 'no hugepages'}"
            )
        out.append({"pageSize": item.page_size, "limit": item.limit})
    return out
