"""The ImageService RPCs over the daemon's socket, against the suite's registry."""

from __future__ import annotations

import json

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from tests.support.daemon import Daemon
from tests.support.imagebuild import Image


async def test_pull_list_status_remove(daemon: Daemon, busybox_ref: str, busybox: Image) -> None:
    images = daemon.images
    spec = cri.ImageSpec(image=busybox_ref)

    pulled = await images.pull_image(cri.PullImageRequest(image=spec))
    listed = await images.list_images(cri.ListImagesRequest())
    status = await images.image_status(cri.ImageStatusRequest(image=spec, verbose=True))
    by_id = await images.image_status(cri.ImageStatusRequest(image=cri.ImageSpec(image=pulled.image_ref)))
    await images.remove_image(cri.RemoveImageRequest(image=spec))
    after = await images.list_images(cri.ListImagesRequest())
    missing = await images.image_status(cri.ImageStatusRequest(image=spec))

    assert pulled.image_ref == busybox.id
    assert [i.id for i in listed.images] == [busybox.id]
    assert status.image is not None
    assert list(status.image.repo_tags) == [busybox_ref]
    assert status.image.size > 0
    assert json.loads(status.info["info"])["config"]["Cmd"] == ["sh"]
    assert by_id.image is not None
    assert by_id.image.id == busybox.id
    assert after.images == []
    assert missing.image is None


async def test_remove_unknown_image_succeeds(daemon: Daemon) -> None:
    await daemon.images.remove_image(
        cri.RemoveImageRequest(image=cri.ImageSpec(image="127.0.0.1:1/none:1")))


async def test_image_fs_info_reports_usage(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))

    info = await daemon.images.image_fs_info(cri.ImageFsInfoRequest())

    assert len(info.image_filesystems) == 1
    usage = info.image_filesystems[0]
    assert usage.used_bytes is not None
    assert usage.used_bytes.value > 0
    assert usage.inodes_used is not None
    assert usage.inodes_used.value > 0
    assert usage.fs_id is not None
    assert usage.fs_id.mountpoint.startswith(str(daemon.root))


async def test_pull_invalid_reference_is_invalid(daemon: Daemon) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.images.pull_image(
            cri.PullImageRequest(image=cri.ImageSpec(image="127.0.0.1:5000/Upper/Case:1")))

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "Upper/Case" in (error.value.message or "")


async def test_pull_unknown_tag_is_not_found(daemon: Daemon, registry: object) -> None:
    host = registry.host  # type: ignore[attr-defined]
    with pytest.raises(GRPCError) as error:
        await daemon.images.pull_image(
            cri.PullImageRequest(image=cri.ImageSpec(image=f"{host}/test/busybox:absent")))

    assert error.value.status is Status.NOT_FOUND
