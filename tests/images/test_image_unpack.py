"""Tests of layer unpacking into snapshot directories (needs root for devices and xattrs)."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from servin_shim.errors import FailedPrecondition, InvalidArgument
from servin_shim.images.content import ContentStore
from servin_shim.images.unpack import SnapshotStore, apply_layer, chain_ids
from tests.support.imagebuild import EPOCH, Layer, LayerBuilder, make_layer, sha256


def unpack(
    tmp_path: Path, layer: Layer, name: str = "fs", lowers: list[Path] | None = None
) -> Path:
    blob = tmp_path / f"{name}.blob"
    blob.write_bytes(layer.blob.data)
    dest = tmp_path / name
    dest.mkdir()
    diff_id = apply_layer(blob, dest, lowers or [])
    assert diff_id == layer.diff_id
    return dest


def unsafe(info: tarfile.TarInfo, builder: LayerBuilder | None = None) -> Layer:
    return (builder or LayerBuilder()).add_raw(info).build("none")


def tarinfo(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def test_chain_ids_rule() -> None:
    first, second = sha256(b"one"), sha256(b"two")
    chains = chain_ids([first, second])
    assert chains[0] == first
    assert chains[1] == sha256(f"{first} {second}".encode())


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions_unpack(tmp_path: Path, compression: str) -> None:
    layer = LayerBuilder().add_file("a/b.txt", b"hello").build(compression)  # type: ignore[arg-type]
    fs = unpack(tmp_path, layer)
    assert (fs / "a/b.txt").read_bytes() == b"hello"


def test_whiteout_becomes_char_device(tmp_path: Path) -> None:
    fs = unpack(tmp_path, LayerBuilder().add_dir("etc").add_whiteout("etc/gone").build())
    st = os.lstat(fs / "etc/gone")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(0, 0)
    assert not (fs / "etc/.wh.gone").exists()


def test_opaque_marker_becomes_xattr(tmp_path: Path) -> None:
    fs = unpack(tmp_path, LayerBuilder().add_dir("data").add_opaque("data").build())
    assert os.getxattr(fs / "data", "trusted.overlay.opaque") == b"y"
    assert os.listdir(fs / "data") == []


def test_file_metadata_kept(tmp_path: Path) -> None:
    layer = LayerBuilder().add_file("bin/su", b"x", mode=0o4755, uid=1000, gid=2000).build()
    st = os.lstat(unpack(tmp_path, layer) / "bin/su")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert st.st_uid == 1000
    assert st.st_gid == 2000
    assert st.st_mtime == EPOCH


def test_setgid_directory_and_mtime(tmp_path: Path) -> None:
    layer = LayerBuilder().add_dir("shared", mode=0o2775, gid=50).add_file("shared/f").build()
    st = os.lstat(unpack(tmp_path, layer) / "shared")
    assert stat.S_IMODE(st.st_mode) == 0o2775
    assert st.st_gid == 50
    assert st.st_mtime == EPOCH


def test_xattrs_kept(tmp_path: Path) -> None:
    layer = LayerBuilder().add_file("f", b"x", xattrs={"user.color": b"blue"}).build()
    assert os.getxattr(unpack(tmp_path, layer) / "f", "user.color") == b"blue"


def test_overlay_xattrs_dropped(tmp_path: Path) -> None:
    layer = LayerBuilder().add_file("f", xattrs={"trusted.overlay.redirect": b"/etc"}).build()
    fs = unpack(tmp_path, layer)
    assert "trusted.overlay.redirect" not in os.listxattr(fs / "f")


def test_symlink_and_hardlink(tmp_path: Path) -> None:
    layer = (
        LayerBuilder()
        .add_file("bin/busybox", b"binary", mode=0o755)
        .add_symlink("bin/sh", "busybox")
        .add_symlink("usr/bin/env", "/bin/busybox")
        .add_hardlink("bin/copy", "bin/busybox")
        .build()
    )
    fs = unpack(tmp_path, layer)
    assert os.readlink(fs / "bin/sh") == "busybox"
    assert os.readlink(fs / "usr/bin/env") == "/bin/busybox"
    assert os.lstat(fs / "bin/copy").st_ino == os.lstat(fs / "bin/busybox").st_ino


def test_devices_and_fifo(tmp_path: Path) -> None:
    layer = (
        LayerBuilder()
        .add_device("dev/null", "c", 1, 3)
        .add_device("dev/loop9", "b", 7, 9, mode=0o660)
        .add_fifo("run/pipe")
        .build()
    )
    fs = unpack(tmp_path, layer)
    null = os.lstat(fs / "dev/null")
    assert stat.S_ISCHR(null.st_mode)
    assert null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(os.lstat(fs / "dev/loop9").st_mode)
    assert stat.S_ISFIFO(os.lstat(fs / "run/pipe").st_mode)


def test_hardlink_to_lower_copied(tmp_path: Path) -> None:
    lower = unpack(tmp_path, LayerBuilder().add_file("lib/a.so", b"lib", mode=0o755).build(), "l")
    upper_layer = LayerBuilder().add_hardlink("lib/b.so", "lib/a.so").build()
    upper = unpack(tmp_path, upper_layer, "u", lowers=[lower])
    assert (upper / "lib/b.so").read_bytes() == b"lib"
    assert stat.S_IMODE(os.lstat(upper / "lib/b.so").st_mode) == 0o755
    assert os.lstat(upper / "lib/b.so").st_ino != os.lstat(lower / "lib/a.so").st_ino


def test_later_entry_replaces_earlier(tmp_path: Path) -> None:
    layer = LayerBuilder().add_dir("x").add_file("x/f").add_file("x", b"file now").build()
    assert (unpack(tmp_path, layer) / "x").read_bytes() == b"file now"


UNSAFE = [
    ("parent", tarinfo("../evil")),
    ("nested-parent", tarinfo("a/../../evil")),
    ("absolute", tarinfo("/etc/evil")),
    ("symlink-out", tarinfo("a/link", tarfile.SYMTYPE, "../../../etc")),
    ("hardlink-out", tarinfo("a/hard", tarfile.LNKTYPE, "../etc/passwd")),
    ("hardlink-abs", tarinfo("a/hard", tarfile.LNKTYPE, "/etc/passwd")),
    ("whiteout-dotdot", tarinfo("a/.wh...")),
]


@pytest.mark.parametrize(("case", "info"), UNSAFE, ids=[case for case, _ in UNSAFE])
def test_unsafe_entry_rejected(tmp_path: Path, case: str, info: tarfile.TarInfo) -> None:
    name = info.name
    with pytest.raises(InvalidArgument) as error:
        unpack(tmp_path, unsafe(info))
    assert repr(name) in str(error.value)
    assert not (tmp_path / "evil").exists()


def test_write_through_symlink_rejected(tmp_path: Path) -> None:
    builder = LayerBuilder().add_symlink("etc", "/etc")
    layer = unsafe(tarinfo("etc/evil"), builder)
    with pytest.raises(InvalidArgument) as error:
        unpack(tmp_path, layer)
    assert "'etc/evil'" in str(error.value)
    assert not Path("/etc/evil").exists()


def test_hardlink_through_symlink_rejected(tmp_path: Path) -> None:
    builder = LayerBuilder().add_symlink("host", "/")
    layer = unsafe(tarinfo("stolen", tarfile.LNKTYPE, "host/etc/shadow"), builder)
    with pytest.raises(InvalidArgument) as error:
        unpack(tmp_path, layer)
    assert "'stolen'" in str(error.value)


def test_garbage_blob_rejected(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    (tmp_path / "fs").mkdir()
    with pytest.raises(InvalidArgument):
        apply_layer(blob, tmp_path / "fs", [])


async def test_snapshot_diff_id_mismatch(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    layer = LayerBuilder().add_file("f", b"x").build()
    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob.data)
    wrong = sha256(b"something else")
    with pytest.raises(FailedPrecondition):
        await store.unpack(wrong, blob, wrong, [])
    assert list(store.dir.iterdir()) == []


async def test_snapshot_unpacked_once(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    layer = LayerBuilder().add_file("f", b"x").build()
    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob.data)
    fs = await store.unpack(layer.diff_id, blob, layer.diff_id, [])
    (fs / "marker").write_text("kept")
    again = await store.unpack(layer.diff_id, blob, layer.diff_id, [])
    assert (again / "marker").read_text() == "kept"
    assert fs == store.fs(layer.diff_id)


def test_crash_leftovers_cleaned(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    (store.dir / "tmp-abc-1234" / "fs").mkdir(parents=True)
    SnapshotStore(tmp_path).clean_temp()
    assert list(store.dir.iterdir()) == []


def test_empty_layer_unpacks(tmp_path: Path) -> None:
    fs = unpack(tmp_path, make_layer(bytes(1024), "gzip"))
    assert os.listdir(fs) == []


def test_gnu_long_names_unpack(tmp_path: Path) -> None:
    name = "d/" + "n" * 150
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = 2
        archive.addfile(info, io.BytesIO(b"ok"))
        link = tarfile.TarInfo("l")
        link.type = tarfile.SYMTYPE
        link.linkname = "t" * 150
        archive.addfile(link)
    fs = unpack(tmp_path, make_layer(buffer.getvalue(), "zstd"))
    assert (fs / name).read_bytes() == b"ok"
    assert os.readlink(fs / "l") == "t" * 150


def test_truncated_layer_rejected(tmp_path: Path) -> None:
    layer = LayerBuilder().add_file("f", b"x" * 5000).build("none")
    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob.data[:1500])
    (tmp_path / "fs").mkdir()
    with pytest.raises(InvalidArgument) as error:
        apply_layer(blob, tmp_path / "fs", [])
    assert "truncated" in str(error.value)


async def test_follower_unpacks_while_written(tmp_path: Path) -> None:
    layer = LayerBuilder().add_file("a/b", b"data" * 10000).build()
    content = ContentStore(tmp_path)
    store = SnapshotStore(tmp_path)
    follower = content.follow(layer.blob.digest, layer.blob.size)
    unpack_task = asyncio.create_task(store.unpack(layer.diff_id, follower, layer.diff_id, []))
    with content.writer(layer.blob.digest, layer.blob.size) as writer:
        half = layer.blob.size // 2
        writer.write(layer.blob.data[:half])
        await asyncio.sleep(0.05)
        writer.reset()  # a server that ignored Range: the unpack must start over
        writer.write(layer.blob.data)
        writer.commit()
    fs = await asyncio.wait_for(unpack_task, 10)
    assert (fs / "a/b").read_bytes() == b"data" * 10000


async def test_follower_failure_discards(tmp_path: Path) -> None:
    layer = LayerBuilder().add_file("f", b"x").build()
    store = SnapshotStore(tmp_path)
    follower = ContentStore(tmp_path).follow(layer.blob.digest, layer.blob.size)
    unpack_task = asyncio.create_task(store.unpack(layer.diff_id, follower, layer.diff_id, []))
    await asyncio.sleep(0.05)
    follower.fail("download failed")
    with pytest.raises(FailedPrecondition):
        await asyncio.wait_for(unpack_task, 10)
    assert list(store.dir.iterdir()) == []
