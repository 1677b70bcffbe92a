"""Command lines the runtime wrapper builds."""

from __future__ import annotations

import json
from pathlib import Path

from servin_shim.oci.reaper import Reaper
from servin_shim.oci.runtime import OCIRuntime


def write_bundle(bundle: Path, cgroups_path: str) -> None:
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"linux": {"cgroupsPath": cgroups_path}}))


def test_create_argv_systemd_slice(tmp_path: Path) -> None:
    runtime = OCIRuntime(Reaper(), name="runc", binary="runc", root=tmp_path / "root")
    write_bundle(tmp_path / "b", "kubepods-besteffort.slice:servin:abc")

    argv = runtime.create_argv("abc", tmp_path / "b", pid_file=tmp_path / "pid")

    assert argv.index("--systemd-cgroup") < argv.index("create")


def test_create_argv_cgroupfs_path(tmp_path: Path) -> None:
    runtime = OCIRuntime(Reaper(), name="runc", binary="runc", root=tmp_path / "root")
    write_bundle(tmp_path / "b", "/kubepods/besteffort/pod1/abc")

    argv = runtime.create_argv("abc", tmp_path / "b", pid_file=tmp_path / "pid")

    assert "--systemd-cgroup" not in argv
    assert argv[:3] == ["runc", "--root", str(tmp_path / "root")]
