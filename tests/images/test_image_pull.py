"""End-to-end tests of ImageService against a real docker-registry on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from servin_shim.errors import FailedPrecondition, Unauthenticated
from servin_shim.images.registry import RegistryAuth
from servin_shim.images.service import ImageService
from servin_shim.state.db import Database
from tests.support.imagebuild import (
    Image,
    LayerBuilder,
    Pusher,
    busybox_image,
    host_arch,
    make_image,
    push_image,
)
from tests.support.registry import Registry


class CountingTransport(httpx.AsyncHTTPTransport):
    """A real HTTP transport that records the path of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await super().handle_async_request(request)


@pytest.fixture
def counting() -> CountingTransport:
    return CountingTransport()


@pytest.fixture
async def service(tmp_path: Path, counting: CountingTransport) -> AsyncIterator[ImageService]:
    db = Database(tmp_path / "servin.db")
    yield ImageService(tmp_path / "images", db, transport=counting, parallel_pulls=2)
    db.close()


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Path]:
    """Mount point for an overlay of snapshot dirs, unmounted at teardown."""
    target = tmp_path / "merged"
    target.mkdir()
    yield target
    subprocess.run(["umount", str(target)], check=False, capture_output=True)


def blob_gets(counting: CountingTransport, digest: str) -> int:
    return sum(1 for path in counting.paths if path.endswith(f"/blobs/{digest}"))


def mount_overlay(layers: list[Path], target: Path) -> None:
    lowerdir = ":".join(str(layer) for layer in reversed(layers))  # top layer first
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", str(target)],
        check=True,
    )


async def test_pull_busybox(service: ImageService, busybox_ref: str, busybox: Image) -> None:
    image_id = await service.pull(busybox_ref)
    layers = service.rootfs_layers(image_id)
    assert image_id == busybox.id
    assert len(layers) == 1
    assert (layers[0] / "bin/busybox").is_file()
    assert os.readlink(layers[0] / "bin/sh") == "busybox"
    assert service.config(image_id)["config"]["Cmd"] == ["sh"]


async def test_blobs_match_digests(service: ImageService, busybox_ref: str) -> None:
    record = service.status(await service.pull(busybox_ref))
    assert record is not None
    for digest in record.blobs:
        data = service.content.path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


async def test_status_lookups(service: ImageService, busybox_ref: str) -> None:
    image_id = await service.pull(busybox_ref)
    record = service.status(image_id)
    assert record is not None
    assert record.repo_tags == [busybox_ref]
    digest_ref = record.repo_digests[0]
    lookups = [image_id, image_id.removeprefix("sha256:"), image_id[7:19], busybox_ref, digest_ref]
    for lookup in lookups:
        found = service.status(lookup)
        assert found is not None, lookup
        assert found.id == image_id, lookup
    assert service.status("127.0.0.1:1/nothing:here") is None
    assert [image.id for image in service.list()] == [image_id]
    assert [image.id for image in service.list(busybox_ref)] == [image_id]
    assert service.list("unknown/image") == []


async def test_layer_semantics(service: ImageService, registry: Registry, overlay: Path) -> None:
    base = (
        LayerBuilder()
        .add_file("etc/keep", b"keep")
        .add_file("etc/gone", b"gone")
        .add_file("data/old1", b"1")
        .add_file("data/old2", b"2")
        .add_file("lib/a.so", b"library", mode=0o755)
        .build()
    )
    upper = (
        LayerBuilder()
        .add_whiteout("etc/gone")
        .add_dir("data")
        .add_opaque("data")
        .add_file("data/new", b"new")
        .add_hardlink("lib/b.so", "lib/a.so")
        .add_symlink("lib/c.so", "a.so")
        .add_file("bin/tool", b"t1", mode=0o755)
        .add_hardlink("bin/tool2", "bin/tool")
        .build("zstd")
    )
    ref = push_image(registry.host, "test/semantics", "1", make_image([base, upper]))
    layers = service.rootfs_layers(await service.pull(ref))
    top = layers[1]
    assert stat.S_ISCHR(os.lstat(top / "etc/gone").st_mode)
    assert os.getxattr(top / "data", "trusted.overlay.opaque") == b"y"
    assert (top / "lib/b.so").read_bytes() == b"library"
    assert os.lstat(top / "bin/tool2").st_ino == os.lstat(top / "bin/tool").st_ino

    mount_overlay(layers, overlay)
    assert sorted(os.listdir(overlay / "etc")) == ["keep"]
    assert sorted(os.listdir(overlay / "data")) == ["new"]
    assert (overlay / "lib/c.so").read_bytes() == b"library"


async def test_concurrent_pulls_share(
    service: ImageService, registry: Registry, counting: CountingTransport
) -> None:
    image = busybox_image(cmd=["echo", "shared"])
    ref = push_image(registry.host, "test/shared", "1", image)
    first, second = await asyncio.gather(service.pull(ref), service.pull(ref))
    manifest_gets = [path for path in counting.paths if path.endswith("/manifests/1")]
    assert first == second
    assert len(manifest_gets) == 1
    assert blob_gets(counting, image.layers[0].blob.digest) == 1


async def test_present_layer_not_fetched(
    service: ImageService, registry: Registry, counting: CountingTransport, busybox_ref: str
) -> None:
    await service.pull(busybox_ref)
    extra = LayerBuilder().add_file("app/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755).build()
    derived = busybox_image(cmd=["/app/run.sh"], extra_layers=[extra])
    ref = push_image(registry.host, "test/derived", "1", derived)
    await service.pull(ref)
    assert blob_gets(counting, derived.layers[0].blob.digest) == 1
    assert blob_gets(counting, extra.blob.digest) == 1


async def test_remove_frees_unshared(service: ImageService, registry: Registry) -> None:
    base = busybox_image()
    extra = LayerBuilder().add_file("only-here", b"x").build()
    derived = busybox_image(extra_layers=[extra])
    base_ref = push_image(registry.host, "test/rm-base", "1", base)
    derived_ref = push_image(registry.host, "test/rm-derived", "1", derived)
    await service.pull(base_ref)
    derived_id = await service.pull(derived_ref)
    derived_layers = service.rootfs_layers(derived_id)

    await service.remove(derived_ref)
    assert service.status(derived_id) is None
    assert not derived_layers[1].exists()
    assert not service.content.has(extra.blob.digest)
    assert derived_layers[0].is_dir()
    assert service.content.has(base.layers[0].blob.digest)


async def test_remove_one_of_two_tags(service: ImageService, registry: Registry) -> None:
    image = busybox_image(cmd=["echo", "tags"])
    with Pusher(registry.host) as pusher:
        first = pusher.push_image("test/tags", "a", image)
        second = pusher.push_image("test/tags", "b", image)
    image_id = await service.pull(first)
    assert await service.pull(second) == image_id

    await service.remove(first)
    record = service.status(image_id)
    assert record is not None
    assert record.repo_tags == [second]
    await service.remove(second)
    assert service.status(image_id) is None
    assert service.content.has(image.config_blob.digest) is False


async def test_remove_unknown_succeeds(service: ImageService) -> None:
    await service.remove("127.0.0.1:1/never/pulled:1")
    await service.remove("sha256:" + "0" * 64)


async def test_corrupt_registry_blob(service: ImageService, registry: Registry) -> None:
    layer = LayerBuilder().add_file("payload", os.urandom(4096)).build("none")
    image = make_image([layer])
    ref = push_image(registry.host, "test/corrupt", "1", image)
    stored = registry.blob_path(layer.blob.digest)
    data = bytearray(stored.read_bytes())
    data[2048] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition) as error:
        await service.pull(ref)
    assert layer.blob.digest in str(error.value)
    assert not service.content.has(layer.blob.digest)
    assert service.list() == []


async def test_index_pull(service: ImageService, registry: Registry) -> None:
    native = busybox_image(cmd=["echo", "native"])
    other_arch = "s390x" if host_arch() != "s390x" else "ppc64le"
    foreign = make_image(native.layers, cmd=["echo", "foreign"], architecture=other_arch)
    with Pusher(registry.host) as pusher:
        pusher.push_index(
            "test/multi",
            "1",
            [
                (foreign, {"os": "linux", "architecture": other_arch}),
                (native, {"os": "linux", "architecture": host_arch()}),
            ],
        )
    assert await service.pull(f"{registry.host}/test/multi:1") == native.id


async def test_image_user_fields(service: ImageService, registry: Registry) -> None:
    numeric = push_image(registry.host, "test/user", "num", busybox_image(user="1000:1000"))
    named = push_image(registry.host, "test/user", "name", busybox_image(user="app"))
    numeric_record = service.status(await service.pull(numeric))
    named_record = service.status(await service.pull(named))
    assert numeric_record is not None
    assert named_record is not None
    assert numeric_record.uid == 1000
    assert numeric_record.username == ""
    assert named_record.uid is None
    assert named_record.username == "app"


async def test_fs_info_counts(service: ImageService, busybox_ref: str) -> None:
    before = await service.fs_info()
    await service.pull(busybox_ref)
    after = await service.fs_info()
    assert after.used_bytes > before.used_bytes + 1_000_000
    assert after.inodes_used > before.inodes_used + 100
    assert after.mount_point == str(service.root)


async def test_registry_basic_auth(service: ImageService, busybox: Image) -> None:
    with Registry(users={"tester": "pass-word"}) as secured:
        ref = push_image(secured.host, "test/private", "1", busybox, auth=("tester", "pass-word"))
        with pytest.raises(Unauthenticated):
            await service.pull(ref)
        with pytest.raises(Unauthenticated):
            await service.pull(ref, RegistryAuth("tester", "wrong"))
        assert await service.pull(ref, RegistryAuth("tester", "pass-word")) == busybox.id
