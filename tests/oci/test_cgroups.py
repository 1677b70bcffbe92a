"""Merging CRI resource updates, and OOM kill counts from v1 and v2 cgroup files."""

from __future__ import annotations

from pathlib import Path

from servin_shim.api.runtime import v1 as cri
from servin_shim.oci import cgroups

MIB = 1024 * 1024


def test_merge_keeps_unset_fields() -> None:
    current = cri.LinuxContainerResources(cpu_shares=256, memory_limit_in_bytes=MIB)

    merged = cgroups.merge_cri_resources(current, cri.LinuxContainerResources(cpu_quota=1000))

    assert merged.cpu_shares == 256
    assert merged.memory_limit_in_bytes == MIB
    assert merged.cpu_quota == 1000


def test_oom_count_from_v1_oom_control(tmp_path: Path) -> None:
    directory = tmp_path / "memory" / "servin" / "pod" / "ctr"
    directory.mkdir(parents=True)
    (directory / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")

    assert cgroups.oom_kill_count("/servin/pod/ctr", root=tmp_path) == 2


def test_oom_count_from_v2_memory_events(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    directory = tmp_path / "servin" / "pod" / "ctr"
    directory.mkdir(parents=True)
    (directory / "memory.events").write_text(
        "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n")

    assert cgroups.oom_kill_count("/servin/pod/ctr", root=tmp_path) == 1


def test_oom_count_of_missing_cgroup_is_zero(tmp_path: Path) -> None:
    assert cgroups.oom_kill_count("/servin/pod/gone", root=tmp_path) == 0


def test_oom_count_ignores_relative_path(tmp_path: Path) -> None:
    assert cgroups.oom_kill_count("servin/pod/ctr", root=tmp_path) == 0
