"""The overlayfs check and the copied root filesystem, compared with a real overlay mount."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from servin_shim.images.rootfs import build_rootfs_copy, overlay_supported
from servin_shim.images.service import ImageService
from tests.support.imagebuild import LayerBuilder, make_image, push_image
from tests.support.registry import Registry


@pytest.fixture
def merged(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "merged"
    target.mkdir()
    yield target
    subprocess.run(["umount", str(target)], check=False, capture_output=True)


def tree(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Map each path under root to (mode, uid, gid, hardlinked file, content or link target)."""
    result = {}
    for current, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(current) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path).encode()
            else:
                content = b""
            key = str(path.relative_to(root))
            # overlayfs reports directory link counts as 1, so only files compare them.
            linked = int(stat.S_ISREG(st.st_mode) and st.st_nlink > 1)
            result[key] = (st.st_mode, st.st_uid, st.st_gid, linked, content)
        dirnames[:] = [d for d in dirnames if not (Path(current) / d).is_symlink()]
    return result


def mount_layers(layers: list[Path], target: Path) -> None:
    lowerdir = ":".join(str(layer) for layer in reversed(layers))  # top layer first
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", str(target)],
        check=True,
    )


def test_overlay_supported_here(tmp_path: Path) -> None:
    assert overlay_supported(tmp_path / "probe")
    assert list((tmp_path / "probe").iterdir()) == []


async def test_copy_matches_overlay(
    make_service: Callable[..., ImageService], registry: Registry, merged: Path, tmp_path: Path
) -> None:
    base = (
        LayerBuilder()
        .add_file("etc/keep", b"keep")
        .add_file("etc/gone", b"gone")
        .add_file("data/old", b"old")
        .add_file("bin/su", b"su", mode=0o4755)
        .add_file("home/app/x", b"x", uid=1000, gid=1000)
        .add_file("lib/a.so", b"lib")
        .build()
    )
    upper = (
        LayerBuilder()
        .add_whiteout("etc/gone")
        .add_dir("data")
        .add_opaque("data")
        .add_file("data/new", b"new")
        .add_hardlink("lib/b.so", "lib/a.so")
        .add_file("opt/one", b"1")
        .add_hardlink("opt/two", "opt/one")
        .add_symlink("opt/link", "one")
        .add_fifo("opt/pipe")
        .add_device("opt/null", "c", 1, 3)
        .build("zstd")
    )
    ref = push_image(registry.host, "test/rootfs-copy", "1", make_image([base, upper]))
    service = make_service()
    layers = service.rootfs_layers(await service.pull(ref))
    mount_layers(layers, merged)
    copied = tmp_path / "copied"
    build_rootfs_copy(layers, copied)
    expected = tree(merged)
    actual = tree(copied)
    assert sorted(actual) == sorted(expected)
    for path, entry in expected.items():
        assert actual[path] == entry, path
    assert os.lstat(copied / "opt/two").st_ino == os.lstat(copied / "opt/one").st_ino
    assert not os.path.lexists(copied / "etc/gone")
    assert sorted(os.listdir(copied / "data")) == ["new"]
