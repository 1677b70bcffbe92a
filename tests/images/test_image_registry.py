"""Tests of the registry client against an in-process fake registry (httpx MockTransport).

The fake covers what docker-registry cannot easily show: bearer tokens, redirects to another
host, schema 1 manifests, artifacts and corrupt responses. No request leaves the process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from servin_shim.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from servin_shim.images.registry import Platform, RegistryAuth, is_insecure_host
from servin_shim.images.service import ImageService
from servin_shim.state.db import Database
from tests.support.imagebuild import Blob, Image, LayerBuilder, host_arch, make_image, make_index

HOST = "registry.test"
STORAGE = "storage.test"
TOKEN = "token-abc"
USER, PASSWORD = "alice", "s3cret-pw"


class FakeRegistry:
    """Serves the same images under every repository name, with configurable authentication and blob redirects."""

    def __init__(self, auth: str | None = None, redirect_blobs: bool = False) -> None:
        self.auth = auth
        self.redirect_blobs = redirect_blobs
        self.manifests: dict[str, Blob] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[httpx.Request] = []
        self.delay = 0.0

    def add_image(self, image: Image, tag: str | None = "1") -> None:
        for layer in image.layers:
            self.blobs[layer.blob.digest] = layer.blob.data
        self.blobs[image.config_blob.digest] = image.config_blob.data
        self.manifests[image.manifest_digest] = image.manifest_blob
        if tag:
            self.manifests[tag] = image.manifest_blob

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        path = request.url.path
        if request.url.host == STORAGE:
            return streamed(self.blobs[path.rsplit("/", 1)[1]])
        if path == "/token":
            return self._token(request)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        parts = path.split("/")
        if "/manifests/" in path:
            blob = self.manifests.get(parts[-1])
            if blob is None:
                return httpx.Response(404)
            return httpx.Response(200, content=blob.data, headers={"content-type": blob.media_type})
        if "/blobs/" in path:
            digest = parts[-1]
            if digest not in self.blobs:
                return httpx.Response(404)
            if self.redirect_blobs:
                return httpx.Response(307, headers={"location": f"https://{STORAGE}/b/{digest}"})
            return streamed(self.blobs[digest])
        return httpx.Response(404)

    def _token(self, request: httpx.Request) -> httpx.Response:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return httpx.Response(401)
        return httpx.Response(200, json={"access_token": TOKEN, "expires_in": 300})

    def _check_auth(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization")
        if self.auth == "bearer" and header != f"Bearer {TOKEN}":
            challenge = f'Bearer realm="https://{HOST}/token",service="{HOST}",scope="x"'
            return httpx.Response(401, headers={"www-authenticate": challenge})
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.auth == "basic" and header != basic:
            return httpx.Response(401, headers={"www-authenticate": 'Basic realm="test"'})
        return None


def streamed(data: bytes) -> httpx.Response:
    """Return a response whose body arrives as a stream, as from a real server."""

    async def body() -> AsyncIterator[bytes]:
        yield data

    return httpx.Response(200, content=body(), headers={"content-length": str(len(data))})


def small_image(**kwargs: object) -> Image:
    layer = LayerBuilder().add_file("hello.txt", b"hello").build()
    return make_image([layer], cmd=["cat", "/hello.txt"], **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def service_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    databases: list[Database] = []

    def build(fake: FakeRegistry, **kwargs: object) -> ImageService:
        db = Database(tmp_path / "servin.db")
        databases.append(db)
        return ImageService(tmp_path / "images", db, transport=fake.transport(), **kwargs)  # type: ignore[arg-type]

    yield build
    for db in databases:
        db.close()


async def test_bearer_token_flow(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry(auth="bearer")
    image = small_image()
    fake.add_image(image)
    service = service_for(fake)
    image_id = await service.pull(f"{HOST}/app:1", RegistryAuth(USER, PASSWORD))
    token_requests = [r for r in fake.requests if r.url.path == "/token"]
    assert image_id == image.id
    assert len(token_requests) == 1
    assert token_requests[0].url.params["scope"] == "repository:app:pull"
    assert token_requests[0].url.params["service"] == HOST


async def test_token_reused_across_pulls(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry(auth="bearer")
    fake.add_image(small_image(), tag="1")
    fake.add_image(small_image(user="1000"), tag="2")
    service = service_for(fake)
    await service.pull(f"{HOST}/app:1", RegistryAuth(USER, PASSWORD))
    await service.pull(f"{HOST}/app:2", RegistryAuth(USER, PASSWORD))
    assert len([r for r in fake.requests if r.url.path == "/token"]) == 1


async def test_bearer_bad_password(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry(auth="bearer")
    fake.add_image(small_image())
    with pytest.raises(Unauthenticated):
        await service_for(fake).pull(f"{HOST}/app:1", RegistryAuth(USER, "wrong"))


async def test_basic_needs_credentials(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry(auth="basic")
    fake.add_image(small_image())
    service = service_for(fake)
    with pytest.raises(Unauthenticated) as error:
        await service.pull(f"{HOST}/app:1")
    assert HOST in str(error.value)
    assert await service.pull(f"{HOST}/app:1", RegistryAuth(USER, PASSWORD))


async def test_redirect_drops_credentials(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry(auth="basic", redirect_blobs=True)
    fake.add_image(small_image())
    await service_for(fake).pull(f"{HOST}/app:1", RegistryAuth(USER, PASSWORD))
    storage = [r for r in fake.requests if r.url.host == STORAGE]
    assert storage
    assert all("authorization" not in r.headers for r in storage)


async def test_secrets_never_logged(service_for, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    fake = FakeRegistry(auth="bearer")
    fake.add_image(small_image())
    await service_for(fake).pull(f"{HOST}/app:1", RegistryAuth(USER, PASSWORD))
    assert PASSWORD not in caplog.text
    assert TOKEN not in caplog.text
    assert PASSWORD not in repr(RegistryAuth(USER, PASSWORD))


async def test_https_for_remote_hosts(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    fake.add_image(small_image())
    await service_for(fake).pull(f"{HOST}/app:1")
    assert {r.url.scheme for r in fake.requests} == {"https"}


def test_plain_http_hosts() -> None:
    assert is_insecure_host("127.0.0.1:5000")
    assert is_insecure_host("127.5.6.7")
    assert is_insecure_host("localhost:5000")
    assert is_insecure_host("[::1]:5000")
    assert is_insecure_host("reg.internal:5000", {"reg.internal:5000"})
    assert not is_insecure_host("quay.io")
    assert not is_insecure_host("10.0.0.1:5000")


async def test_schema1_rejected(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    schema1 = {"schemaVersion": 1, "name": "app", "tag": "1", "fsLayers": []}
    fake.manifests["1"] = Blob(
        "application/vnd.docker.distribution.manifest.v1+prettyjws", json.dumps(schema1).encode()
    )
    with pytest.raises(InvalidArgument) as error:
        await service_for(fake).pull(f"{HOST}/app:1")
    assert "schema 1" in str(error.value)


async def test_artifact_rejected(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    config = Blob("application/vnd.example.config+json", b"{}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.descriptor(),
        "layers": [],
    }
    fake.manifests["1"] = Blob(manifest["mediaType"], json.dumps(manifest).encode())
    with pytest.raises(FailedPrecondition) as error:
        await service_for(fake).pull(f"{HOST}/app:1")
    assert "not a container image" in str(error.value)


async def test_index_picks_host_platform(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    native = small_image()
    other_arch = "s390x" if host_arch() != "s390x" else "ppc64le"
    foreign = small_image(architecture=other_arch)
    fake.add_image(native, tag=None)
    fake.add_image(foreign, tag=None)
    index = make_index(
        [
            (foreign, {"os": "linux", "architecture": other_arch}),
            (native, {"os": "linux", "architecture": host_arch()}),
        ]
    )
    fake.manifests["1"] = index
    service = service_for(fake)
    image_id = await service.pull(f"{HOST}/app:1")
    record = service.status(image_id)
    assert image_id == native.id
    assert record is not None
    assert record.repo_digests == [f"{HOST}/app@{index.digest}"]


async def test_index_without_platform(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    foreign = small_image(architecture="s390x")
    fake.add_image(foreign, tag=None)
    fake.manifests["1"] = make_index([(foreign, {"os": "linux", "architecture": "s390x"})])
    service = service_for(fake, platform=Platform("linux", "amd64"))
    with pytest.raises(NotFound) as error:
        await service.pull(f"{HOST}/app:1")
    assert "linux/amd64" in str(error.value)
    assert "linux/s390x" in str(error.value)


def test_arm64_variant_matches() -> None:
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert not Platform("linux", "arm", "v6").matches(Platform("linux", "arm", "v7"))


async def test_corrupt_blob_rejected(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    image = small_image()
    fake.add_image(image)
    layer_digest = image.layers[0].blob.digest
    data = bytearray(fake.blobs[layer_digest])
    data[-5] ^= 0xFF
    fake.blobs[layer_digest] = bytes(data)
    service = service_for(fake)
    with pytest.raises(FailedPrecondition) as error:
        await service.pull(f"{HOST}/app:1")
    assert layer_digest in str(error.value)
    assert not service.content.has(layer_digest)
    assert list(service.snapshots.dir.iterdir()) == []
    assert service.list() == []


async def test_wrong_diff_id_rejected(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    layer = LayerBuilder().add_file("a", b"a").build()
    image = make_image([layer], diff_ids=["sha256:" + "0" * 64])
    fake.add_image(image)
    service = service_for(fake)
    with pytest.raises(FailedPrecondition) as error:
        await service.pull(f"{HOST}/app:1")
    assert "diff ID mismatch" in str(error.value)
    assert list(service.snapshots.dir.iterdir()) == []


async def test_pull_timeout(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    fake.add_image(small_image())
    fake.delay = 5.0
    with pytest.raises(DeadlineExceeded):
        await service_for(fake, pull_timeout=0.2).pull(f"{HOST}/app:1")


async def test_mirror_tried_first(service_for) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    fake.add_image(small_image())
    service = service_for(fake, registry_mirrors={"docker.io": [f"https://{HOST}"]})
    await service.pull("app:1", RegistryAuth(USER, PASSWORD))
    first = fake.requests[0]
    assert first.url.host == HOST
    assert first.url.path == "/v2/library/app/manifests/1"
    assert all("authorization" not in r.headers for r in fake.requests)


def test_auth_from_encoded() -> None:
    auth = RegistryAuth.from_encoded(base64.b64encode(b"bob:pa:ss").decode())
    assert auth.username == "bob"
    assert auth.password == "pa:ss"
    with pytest.raises(InvalidArgument):
        RegistryAuth.from_encoded("not base64!")
