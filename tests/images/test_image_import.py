"""Imports of archives that skopeo writes (OCI layout and docker save) through the CLI and API."""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from servin_shim.errors import InvalidArgument
from servin_shim.images.archive import import_archive
from servin_shim.images.service import ImageService
from servin_shim.state.db import Database
from tests.support.daemon import SERVIN_BINARY
from tests.support.imagebuild import Image


def skopeo_copy(source_ref: str, destination: str) -> None:
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{source_ref}",
            destination,
        ],
        check=True,
        capture_output=True,
    )


async def test_import_oci_archive(
    make_service: Callable[..., ImageService], tmp_path: Path, busybox_ref: str, busybox: Image
) -> None:
    archive = tmp_path / "oci.tar"
    skopeo_copy(busybox_ref, f"oci-archive:{archive}:example.test/tools/busybox:2")
    service = make_service()
    imported = await import_archive(service, archive)
    record = service.status("example.test/tools/busybox:2")
    assert [image.id for image in imported] == [busybox.id]
    assert record is not None
    assert record.repo_tags == ["example.test/tools/busybox:2"]
    assert (service.rootfs_layers(busybox.id)[0] / "bin/busybox").is_file()


async def test_import_docker_archive(
    make_service: Callable[..., ImageService], tmp_path: Path, busybox_ref: str, busybox: Image
) -> None:
    archive = tmp_path / "docker.tar"
    skopeo_copy(busybox_ref, f"docker-archive:{archive}:tools/busybox:3")
    service = make_service()
    imported = await import_archive(service, archive)
    record = service.status("docker.io/tools/busybox:3")
    assert [image.id for image in imported] == [busybox.id]
    assert record is not None
    assert record.repo_tags == ["docker.io/tools/busybox:3"]
    assert record.config["config"]["Cmd"] == ["sh"]
    assert (service.rootfs_layers(busybox.id)[0] / "bin/busybox").is_file()


async def test_import_rejects_other_tar(
    make_service: Callable[..., ImageService], tmp_path: Path
) -> None:
    (tmp_path / "file.txt").write_text("x")
    archive = tmp_path / "plain.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "file.txt", arcname="file.txt")
    with pytest.raises(InvalidArgument) as error:
        await import_archive(make_service(), archive)
    assert "neither an OCI image layout" in str(error.value)


def test_import_cli(tmp_path: Path, busybox_ref: str, busybox: Image) -> None:
    archive = tmp_path / "cli.tar"
    skopeo_copy(busybox_ref, f"oci-archive:{archive}:example.test/cli/busybox:1")
    root = tmp_path / "root"
    result = subprocess.run(
        [SERVIN_BINARY, "image", "import", str(archive), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == [busybox.id, "example.test/cli/busybox:1"]
    assert result.stdout.split()[2].startswith("example.test/cli/busybox@sha256:")
    db = Database(root / "servin.db")
    try:
        service = ImageService(root, db)
        record = service.status("example.test/cli/busybox:1")
    finally:
        db.close()
    assert record is not None
    assert record.id == busybox.id


def test_import_cli_missing_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [SERVIN_BINARY, "image", "import", str(tmp_path / "none.tar"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "none.tar" in result.stderr
