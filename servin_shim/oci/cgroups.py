"""Container cgroups after create: merging resource updates, and OOM kill counts.

The conversion of CRI resources into OCI ``linux.resources`` lives in ``oci.resources``, which
both the container spec and UpdateContainerResources use.

A container's cgroup is the spec's ``linux.cgroupsPath``, read as a cgroupfs-driver path. On a
cgroup v1 host it is that path below each controller mount, and runc treats hybrid hosts as
v1. On a pure cgroup v2 host it is that path below ``/sys/fs/cgroup``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from servin_shim.api.runtime import v1 as cri

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def is_unified(root: Path = CGROUP_ROOT) -> bool:
    """Return True on a pure cgroup v2 host, where the v2 hierarchy is mounted at ``root``."""
    return (root / "cgroup.controllers").exists()


def merge_cri_resources(
    current: cri.LinuxContainerResources | None, update: cri.LinuxContainerResources
) -> cri.LinuxContainerResources:
    """Return ``current`` with every field that ``update`` sets (non-zero) replaced."""
    merged = cri.LinuxContainerResources()
    if current is not None:
        merged = cri.LinuxContainerResources.parse(bytes(current))
    for name in (
        "cpu_period", "cpu_quota", "cpu_shares", "memory_limit_in_bytes", "oom_score_adj",
        "cpuset_cpus", "cpuset_mems", "memory_swap_limit_in_bytes",
    ):
        value = getattr(update, name)
        if value:
            setattr(merged, name, value)
    if update.hugepage_limits:
        merged.hugepage_limits = list(update.hugepage_limits)
    if update.unified:
        merged.unified = {**merged.unified, **update.unified}
    return merged


def cgroup_dir(cgroups_path: str, controller: str, root: Path = CGROUP_ROOT) -> Path | None:
    """Return the directory of a cgroupfs-driver ``cgroupsPath`` for one v1 controller.

    On a pure v2 host the controller is ignored. Returns None for any other form: a relative
    path, or the systemd driver's ``slice:prefix:name``.
    """
    # NOTE: OOM kills of containers under the systemd cgroup driver are therefore not detected.
    if not cgroups_path.startswith("/"):
        return None
    relative = cgroups_path.lstrip("/")
    if is_unified(root):
        return root / relative
    return root / controller / relative


def oom_kill_count(cgroups_path: str, root: Path = CGROUP_ROOT) -> int:
    """Return how many processes the kernel OOM killer killed in a container's cgroup.

    Reads ``oom_kill`` from ``memory.events`` (cgroup v2) or ``memory.oom_control`` (cgroup v1,
    kernel 4.13 or later). Returns 0 when the cgroup or the counter is missing, for example
    after ``runc delete`` removed the cgroup.
    """
    directory = cgroup_dir(cgroups_path, "memory", root)
    if directory is None:
        return 0
    name = "memory.events" if is_unified(root) else "memory.oom_control"
    try:
        text = (directory / name).read_text()
    except OSError as exc:
        log.debug("no OOM counter for cgroup path=%s: %s", directory, exc)
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    # NOTE: kernels before 4.13 have no oom_kill counter in cgroup v1, so an OOM kill on them
    # is reported as a plain error exit.
    return 0


def remove_cgroup(cgroups_path: str, root: Path = CGROUP_ROOT) -> None:
    """Remove a cgroupfs-driver cgroup and its empty children from every mounted hierarchy.

    runc removes the cgroup of each container it deletes, but not the parents it created on the
    way, such as a pod's own cgroup. A cgroup that still has processes stays, with a warning.
    """
    if not cgroups_path.startswith("/") or cgroups_path.strip("/") == "":
        return
    relative = cgroups_path.strip("/")
    hierarchies = [root] if is_unified(root) else [p for p in root.iterdir() if p.is_dir()]
    for hierarchy in hierarchies:
        top = hierarchy / relative
        if not top.is_dir():
            continue
        # Children first: a cgroup directory can only be removed once it has none.
        for directory, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(directory)
            except OSError as exc:
                log.warning("failed to remove cgroup path=%s: %s", directory, exc)
