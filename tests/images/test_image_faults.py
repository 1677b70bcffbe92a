"""Pulls through a FaultProxy in front of a real docker-registry: retries, resumes, timeouts,
cancellation, shared downloads, mirrors and foreign layers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterator

import pytest

from servin_shim.errors import DeadlineExceeded, NotFound
from servin_shim.images.service import ImageService, MirrorSettings
from tests.support.imagebuild import (
    OCI_MANIFEST,
    Blob,
    Image,
    LayerBuilder,
    Pusher,
    make_image,
    push_image,
)
from tests.support.registry import Fault, FaultProxy, Registry

BLOB_BYTES = 2 * 1024 * 1024


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as server:
        yield server


@pytest.fixture(scope="module")
def big_image() -> Image:
    """An image with one uncompressed 2 MiB layer of random bytes."""
    layer = LayerBuilder().add_file("payload.bin", os.urandom(BLOB_BYTES)).build("none")
    return make_image([layer], cmd=["true"])


@pytest.fixture(scope="module")
def big_ref_path(registry: Registry, big_image: Image) -> str:
    """Repository and tag of big_image in the registry, to prefix with a proxy host."""
    push_image(registry.host, "test/big", "1", big_image)
    return "test/big:1"


def layer_path(image: Image) -> str:
    return f"/blobs/{image.layers[0].blob.digest}"


async def test_truncated_blob_resumed(
    make_service: Callable[..., ImageService],
    proxy: FaultProxy,
    big_image: Image,
    big_ref_path: str,
) -> None:
    proxy.faults.append(Fault(layer_path(big_image), cut_after=500_000))
    service = make_service()
    image_id = await service.pull(f"{proxy.host}/{big_ref_path}")
    gets = [r for r in proxy.requests if r.path.endswith(layer_path(big_image))]
    assert image_id == big_image.id
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    assert gets[1].headers["range"] == "bytes=500000-"
    payload = service.rootfs_layers(image_id)[0] / "payload.bin"
    assert payload.stat().st_size == BLOB_BYTES


async def test_server_errors_retried(
    make_service: Callable[..., ImageService],
    proxy: FaultProxy,
    big_image: Image,
    big_ref_path: str,
) -> None:
    proxy.faults.append(Fault(layer_path(big_image), times=2, status=503))
    proxy.faults.append(Fault("/manifests/1", times=1, status=502))
    assert await make_service().pull(f"{proxy.host}/{big_ref_path}") == big_image.id
    assert proxy.count(layer_path(big_image)) == 3
    assert proxy.count("/manifests/1") == 2


async def test_retry_after_honoured(
    make_service: Callable[..., ImageService],
    proxy: FaultProxy,
    big_image: Image,
    big_ref_path: str,
) -> None:
    proxy.faults.append(Fault(layer_path(big_image), status=429, retry_after="1"))
    started = time.monotonic()
    assert await make_service().pull(f"{proxy.host}/{big_ref_path}") == big_image.id
    assert time.monotonic() - started >= 0.9


async def test_corrupt_resume_rejected(
    make_service: Callable[..., ImageService],
    registry: Registry,
) -> None:
    layer = LayerBuilder().add_file("data", os.urandom(300_000)).build("none")
    image = make_image([layer])
    push_image(registry.host, "test/corrupt-resume", "1", image)
    stored = registry.blob_path(layer.blob.digest)
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0xFF
    stored.write_bytes(bytes(data))
    with FaultProxy(registry.host) as proxy:
        proxy.faults.append(Fault(f"/blobs/{layer.blob.digest}", cut_after=100_000))
        service = make_service()
        with pytest.raises(Exception) as error:
            await service.pull(f"{proxy.host}/test/corrupt-resume:1")
    assert "digest mismatch" in str(error.value)
    assert not service.content.has(layer.blob.digest)
    assert list(service.content.ingest_dir.iterdir()) == []


async def test_stalled_pull_cancelled(
    make_service: Callable[..., ImageService],
    proxy: FaultProxy,
    big_image: Image,
    big_ref_path: str,
) -> None:
    proxy.faults.append(Fault(layer_path(big_image), stall_after=100_000))
    service = make_service(progress_timeout=0.5)
    with pytest.raises(DeadlineExceeded) as error:
        await service.pull(f"{proxy.host}/{big_ref_path}")
    assert "received no data" in str(error.value)
    assert list(service.content.ingest_dir.iterdir()) == []
    assert service.list() == []


async def test_slow_pull_continues(
    make_service: Callable[..., ImageService],
    registry: Registry,
    big_image: Image,
    big_ref_path: str,
) -> None:
    # 2 MiB at 4 MiB/s takes about 0.5 s, longer than the progress timeout of 0.3 s.
    with FaultProxy(registry.host, bytes_per_second=4 * 1024 * 1024) as slow:
        service = make_service(progress_timeout=0.3)
        started = time.monotonic()
        image_id = await service.pull(f"{slow.host}/{big_ref_path}")
    assert image_id == big_image.id
    assert time.monotonic() - started > 0.3


async def test_cancel_stops_download(
    make_service: Callable[..., ImageService],
    registry: Registry,
    big_image: Image,
    big_ref_path: str,
) -> None:
    with FaultProxy(registry.host, bytes_per_second=256 * 1024) as slow:
        service = make_service()
        pull = asyncio.create_task(service.pull(f"{slow.host}/{big_ref_path}"))
        deadline = time.monotonic() + 10
        while not any(service.content.ingest_dir.iterdir()):
            assert time.monotonic() < deadline, "the layer download never started"
            await asyncio.sleep(0.02)
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
        await asyncio.sleep(0.1)
        requests_after_cancel = len(slow.requests)
        await asyncio.sleep(0.3)
        assert service._pulls == {}
        assert list(service.content.ingest_dir.iterdir()) == []
        assert len(slow.requests) == requests_after_cancel
        assert not service.content.has(big_image.layers[0].blob.digest)


async def test_concurrent_pulls_download_once(
    make_service: Callable[..., ImageService],
    registry: Registry,
    proxy: FaultProxy,
) -> None:
    layers = [
        LayerBuilder().add_file(f"layer{i}", os.urandom(200_000)).build("gzip") for i in range(3)
    ]
    image = make_image(layers, cmd=["true"])
    with Pusher(registry.host) as pusher:
        pusher.push_image("test/shared-pull", "a", image)
        pusher.push_image("test/shared-pull", "b", image)
    service = make_service(parallel_pulls=2)
    base = f"{proxy.host}/test/shared-pull"
    results = await asyncio.gather(
        service.pull(f"{base}:a"), service.pull(f"{base}:a"), service.pull(f"{base}:b")
    )
    assert results == [image.id] * 3
    for layer in layers:
        assert proxy.count(f"/blobs/{layer.blob.digest}") == 1
    assert proxy.count(f"/blobs/{image.config_blob.digest}") == 1
    assert proxy.count("/manifests/a") == 1


async def test_layer_in_store_not_fetched(
    make_service: Callable[..., ImageService],
    proxy: FaultProxy,
    big_image: Image,
    big_ref_path: str,
) -> None:
    service = make_service()
    ref = f"{proxy.host}/{big_ref_path}"
    await service.pull(ref)
    await service.pull(ref)
    assert proxy.count(layer_path(big_image)) == 1


async def test_progress_logged(
    make_service: Callable[..., ImageService],
    proxy: FaultProxy,
    big_image: Image,
    big_ref_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    await make_service().pull(f"{proxy.host}/{big_ref_path}")
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("image pulled")]
    assert len(done) == 1
    assert "layers=1/1" in done[0]
    total = big_image.layers[0].blob.size + big_image.config_blob.size
    assert f"bytes={total}/{total}" in done[0]
    assert "rate_mb_s=" in done[0]


# --- mirrors ------------------------------------------------------------------------------


async def test_mirror_404_falls_through(
    make_service: Callable[..., ImageService],
    registry: Registry,
    big_image: Image,
    big_ref_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with Registry() as empty, FaultProxy(empty.host) as mirror:
        service = make_service(registry_mirrors={registry.host: [f"http://{mirror.host}"]})
        ref = f"{registry.host}/{big_ref_path}"
        image_id = await service.pull(ref)
    record = service.status(image_id)
    served = [r.getMessage() for r in caplog.records if r.getMessage().startswith("image served")]
    assert mirror.count("/manifests/1") == 1
    assert record is not None
    assert record.repo_tags == [ref]
    assert f"endpoint={registry.host} " in served[0]


async def test_mirror_down_falls_through(
    make_service: Callable[..., ImageService],
    registry: Registry,
    big_image: Image,
    big_ref_path: str,
) -> None:
    service = make_service(registry_mirrors={registry.host: ["http://127.0.0.1:1"]})
    started = time.monotonic()
    assert await service.pull(f"{registry.host}/{big_ref_path}") == big_image.id
    assert time.monotonic() - started < 5


async def test_mirror_serves_image(
    make_service: Callable[..., ImageService],
    registry: Registry,
    big_image: Image,
    big_ref_path: str,
) -> None:
    with FaultProxy(registry.host) as upstream, FaultProxy(registry.host) as mirror:
        service = make_service(registry_mirrors={upstream.host: [mirror.host]})
        ref = f"{upstream.host}/{big_ref_path}"
        image_id = await service.pull(ref)
    record = service.status(image_id)
    assert upstream.requests == []
    assert mirror.count(layer_path(big_image)) == 1
    assert record is not None
    assert record.repo_tags == [ref]


async def test_skip_upstream(
    make_service: Callable[..., ImageService],
    registry: Registry,
    big_ref_path: str,
) -> None:
    with Registry() as empty, FaultProxy(registry.host) as upstream:
        mirrors = {upstream.host: MirrorSettings((f"http://{empty.host}",), skip_upstream=True)}
        service = make_service(registry_mirrors=mirrors)
        with pytest.raises(NotFound):
            await service.pull(f"{upstream.host}/{big_ref_path}")
    assert upstream.requests == []


# --- foreign layers -----------------------------------------------------------------------

FOREIGN_TYPE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"


def push_foreign(registry: Registry, repository: str, url: str, with_blob: bool) -> Image:
    """Push an image whose only layer is non-distributable, with ``url`` as its location."""
    layer = LayerBuilder().add_file("foreign.txt", b"from elsewhere").build("gzip")
    image = make_image([layer])
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": image.config_blob.descriptor(),
        "layers": [
            {
                "mediaType": FOREIGN_TYPE,
                "digest": layer.blob.digest,
                "size": layer.blob.size,
                "urls": [url.format(digest=layer.blob.digest)],
            }
        ],
    }
    manifest_blob = Blob(OCI_MANIFEST, json.dumps(manifest).encode())
    with Pusher(registry.host) as pusher:
        pusher.push_blob("test/foreign-source", layer.blob)
        if with_blob:
            pusher.push_blob(repository, layer.blob)
        pusher.push_blob(repository, image.config_blob)
        pusher.push_manifest(repository, "1", manifest_blob)
    return image


async def test_foreign_layer_from_url(
    make_service: Callable[..., ImageService], registry: Registry, proxy: FaultProxy
) -> None:
    url = f"http://{proxy.host}/v2/test/foreign-source/blobs/{{digest}}"
    image = push_foreign(registry, "test/foreign", url, with_blob=False)
    service = make_service()
    image_id = await service.pull(f"{registry.host}/test/foreign:1")
    fs = service.rootfs_layers(image_id)[0]
    assert image_id == image.id
    assert proxy.count(f"/blobs/{image.layers[0].blob.digest}") == 1
    assert (fs / "foreign.txt").read_bytes() == b"from elsewhere"


async def test_foreign_url_missing(
    make_service: Callable[..., ImageService], registry: Registry, proxy: FaultProxy
) -> None:
    url = f"http://{proxy.host}/v2/test/nowhere/blobs/{{digest}}"
    image = push_foreign(registry, "test/foreign-fallback", url, with_blob=True)
    image_id = await make_service().pull(f"{registry.host}/test/foreign-fallback:1")
    assert image_id == image.id
    assert proxy.count(f"/blobs/{image.layers[0].blob.digest}") == 1
