"""Pulls through the real daemon: a crash in the middle of a pull, cancelled RPCs and credentials."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from servin_shim.api.runtime import v1 as cri
from tests.support.daemon import Daemon
from tests.support.imagebuild import Image, LayerBuilder, Pusher, make_image
from tests.support.registry import FaultProxy, Registry

LAYER_BYTES = 6 * 1024 * 1024
USER, PASSWORD = "puller", "daemon-pass-1"


@pytest.fixture(scope="module")
def big_image(registry: Registry) -> Image:
    """A 3-layer image of 18 MiB of random bytes, pushed as test/crash:1."""
    layers = [
        LayerBuilder().add_file(f"blob{i}.bin", os.urandom(LAYER_BYTES)).build("none")
        for i in range(3)
    ]
    image = make_image(layers, cmd=["true"])
    with Pusher(registry.host) as pusher:
        pusher.push_image("test/crash", "1", image)
    return image


@pytest.fixture
def slow_proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host, bytes_per_second=4 * 1024 * 1024) as proxy:
        yield proxy


def ingest_dir(daemon: Daemon) -> Path:
    return daemon.root / "content" / "ingest"


def blobs_dir(daemon: Daemon) -> Path:
    return daemon.root / "content" / "blobs" / "sha256"


async def wait_for_partial(daemon: Daemon, minimum: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        partials = list(ingest_dir(daemon).glob("*.partial")) if ingest_dir(daemon).exists() else []
        if any(p.stat().st_size >= minimum for p in partials):
            return
        assert time.monotonic() < deadline, "no partial download appeared"
        await asyncio.sleep(0.05)


async def test_killed_mid_pull(daemon: Daemon, slow_proxy: FaultProxy, big_image: Image) -> None:
    spec = cri.ImageSpec(image=f"{slow_proxy.host}/test/crash:1")
    pull = asyncio.create_task(daemon.images.pull_image(cri.PullImageRequest(image=spec)))
    await wait_for_partial(daemon, 1024 * 1024)
    daemon.stop(signal.SIGKILL)
    with pytest.raises((GRPCError, StreamTerminatedError, ConnectionError)):
        await pull

    for blob in blobs_dir(daemon).iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert any(ingest_dir(daemon).iterdir())

    daemon.start()
    slow_proxy.bytes_per_second = None
    assert list(ingest_dir(daemon).iterdir()) == []
    pulled = await daemon.images.pull_image(cri.PullImageRequest(image=spec))
    status = await daemon.images.image_status(cri.ImageStatusRequest(image=spec))
    assert pulled.image_ref == big_image.id
    assert status.image is not None
    assert status.image.size == sum(layer.blob.size for layer in big_image.layers) + (
        big_image.config_blob.size
    )


async def test_cancelled_rpc_stops(
    daemon: Daemon, slow_proxy: FaultProxy, big_image: Image
) -> None:
    spec = cri.ImageSpec(image=f"{slow_proxy.host}/test/crash:1")
    with pytest.raises((GRPCError, asyncio.TimeoutError)):
        await daemon.images.pull_image(cri.PullImageRequest(image=spec), timeout=1.0)
    await asyncio.sleep(0.5)
    requests_after = len(slow_proxy.requests)
    await asyncio.sleep(0.5)
    assert list(ingest_dir(daemon).iterdir()) == []
    assert len(slow_proxy.requests) == requests_after
    assert "pull cancelled, no caller waits" in daemon.log_text()


@pytest.fixture(scope="module")
def private_registry(big_image: Image) -> Iterator[Registry]:
    small = make_image([LayerBuilder().add_file("hello", b"hi").build()], cmd=["true"])
    with Registry(users={USER: PASSWORD}) as registry:
        with Pusher(registry.host, auth=(USER, PASSWORD)) as pusher:
            pusher.push_image("test/private", "1", small)
        yield registry


async def test_pull_with_credentials(daemon: Daemon, private_registry: Registry) -> None:
    spec = cri.ImageSpec(image=f"{private_registry.host}/test/private:1")
    right = cri.AuthConfig(username=USER, password=PASSWORD)
    wrong = cri.AuthConfig(username=USER, password="wrong")

    with pytest.raises(GRPCError) as error:
        await daemon.images.pull_image(cri.PullImageRequest(image=spec, auth=wrong))
    pulled = await daemon.images.pull_image(cri.PullImageRequest(image=spec, auth=right))

    assert error.value.status == Status.UNAUTHENTICATED
    assert private_registry.host in (error.value.message or "")
    assert "authentication" in (error.value.message or "")
    assert pulled.image_ref.startswith("sha256:")
    assert PASSWORD not in daemon.log_text()


async def test_invalid_reference_named(daemon: Daemon) -> None:
    spec = cri.ImageSpec(image="Bad//Name:tag")
    with pytest.raises(GRPCError) as error:
        await daemon.images.pull_image(cri.PullImageRequest(image=spec))
    assert error.value.status == Status.INVALID_ARGUMENT
    assert "Bad//Name:tag" in (error.value.message or "")
