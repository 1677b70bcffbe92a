"""Pulls from real docker-registry instances with htpasswd Basic auth and with token auth.

The token registry trusts a TokenServer on 127.0.0.1 that signs RS256 JWTs, so the whole
distribution bearer flow runs for real: challenge, token request, signed token, pull.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from servin_shim.errors import Unauthenticated
from servin_shim.images.auth import RegistryAuth
from servin_shim.images.service import ImageService
from tests.support.imagebuild import Image, Pusher, busybox_image
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

USER, PASSWORD = "tester", "correct-horse-7"
REFRESH = "refresh-0123456789"


@pytest.fixture(scope="module")
def image() -> Image:
    return busybox_image(cmd=["echo", "private"])


@pytest.fixture(scope="module")
def tokens() -> Iterator[TokenServer]:
    server = TokenServer(
        users={USER: PASSWORD},
        refresh_tokens={REFRESH: USER},
        anonymous_repositories={"test/public"},
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def token_registry(tokens: TokenServer, image: Image) -> Iterator[Registry]:
    with Registry(auth=tokens.registry_auth_config()) as registry:
        for repository in ("test/private", "test/public"):
            bearer = tokens.token_for(USER, repository)
            with Pusher(registry.host, bearer=bearer) as pusher:
                pusher.push_image(repository, "1", image)
        yield registry


@pytest.fixture(scope="module")
def basic_registry(image: Image) -> Iterator[Registry]:
    with Registry(users={USER: PASSWORD}) as registry:
        with Pusher(registry.host, auth=(USER, PASSWORD)) as pusher:
            pusher.push_image("test/private", "1", image)
        yield registry


async def test_token_right_password(
    make_service: Callable[..., ImageService],
    token_registry: Registry,
    tokens: TokenServer,
    image: Image,
) -> None:
    before = len(tokens.requests)
    service = make_service()
    ref = f"{token_registry.host}/test/private:1"
    image_id = await service.pull(ref, RegistryAuth(USER, PASSWORD))
    token_gets = [r for r in tokens.requests[before:] if r.method == "GET"]
    assert image_id == image.id
    assert len(token_gets) == 1
    assert token_gets[0].query["scope"] == ["repository:test/private:pull"]
    assert token_gets[0].authorization.startswith("Basic ")


async def test_token_wrong_password(
    make_service: Callable[..., ImageService], token_registry: Registry
) -> None:
    service = make_service()
    with pytest.raises(Unauthenticated) as error:
        await service.pull(f"{token_registry.host}/test/private:1", RegistryAuth(USER, "nope"))
    assert token_registry.host in str(error.value)
    assert "authentication" in str(error.value)
    assert "failed" in str(error.value)
    assert service.list() == []


async def test_token_anonymous_private(
    make_service: Callable[..., ImageService], token_registry: Registry
) -> None:
    with pytest.raises(Unauthenticated) as error:
        await make_service().pull(f"{token_registry.host}/test/private:1")
    assert "requires authentication" in str(error.value)


async def test_token_anonymous_public(
    make_service: Callable[..., ImageService], token_registry: Registry, image: Image
) -> None:
    assert await make_service().pull(f"{token_registry.host}/test/public:1") == image.id


async def test_token_reused(
    make_service: Callable[..., ImageService],
    token_registry: Registry,
    tokens: TokenServer,
) -> None:
    service = make_service()
    ref = f"{token_registry.host}/test/private:1"
    before = len(tokens.requests)
    await service.pull(ref, RegistryAuth(USER, PASSWORD))
    await service.remove(ref)
    await service.pull(ref, RegistryAuth(USER, PASSWORD))
    assert len(tokens.requests) - before == 1


async def test_identity_token_exchanged(
    make_service: Callable[..., ImageService],
    token_registry: Registry,
    tokens: TokenServer,
    image: Image,
) -> None:
    before = len(tokens.requests)
    auth = RegistryAuth(identity_token=REFRESH)
    image_id = await make_service().pull(f"{token_registry.host}/test/private:1", auth)
    posts = [r for r in tokens.requests[before:] if r.method == "POST"]
    assert image_id == image.id
    assert len(posts) == 1
    assert posts[0].form["grant_type"] == ["refresh_token"]
    assert posts[0].form["refresh_token"] == [REFRESH]
    assert posts[0].form["scope"] == ["repository:test/private:pull"]


async def test_identity_token_invalid(
    make_service: Callable[..., ImageService], token_registry: Registry
) -> None:
    auth = RegistryAuth(identity_token="not-a-known-refresh-token")
    with pytest.raises(Unauthenticated) as error:
        await make_service().pull(f"{token_registry.host}/test/private:1", auth)
    assert "authentication to registry" in str(error.value)


async def test_basic_right_password(
    make_service: Callable[..., ImageService], basic_registry: Registry, image: Image
) -> None:
    ref = f"{basic_registry.host}/test/private:1"
    assert await make_service().pull(ref, RegistryAuth(USER, PASSWORD)) == image.id


async def test_basic_wrong_password(
    make_service: Callable[..., ImageService], basic_registry: Registry
) -> None:
    with pytest.raises(Unauthenticated) as error:
        await make_service().pull(
            f"{basic_registry.host}/test/private:1", RegistryAuth(USER, "wrong")
        )
    assert basic_registry.host in str(error.value)
    assert "authentication" in str(error.value)
    assert "failed" in str(error.value)


async def test_server_address_elsewhere(
    make_service: Callable[..., ImageService], basic_registry: Registry
) -> None:
    auth = RegistryAuth(USER, PASSWORD, server_address="other.example:5000")
    with pytest.raises(Unauthenticated) as error:
        await make_service().pull(f"{basic_registry.host}/test/private:1", auth)
    assert "requires authentication" in str(error.value)


async def test_server_address_matches(
    make_service: Callable[..., ImageService], basic_registry: Registry, image: Image
) -> None:
    auth = RegistryAuth(USER, PASSWORD, server_address=f"http://{basic_registry.host}")
    assert await make_service().pull(f"{basic_registry.host}/test/private:1", auth) == image.id


async def test_secrets_not_logged(
    make_service: Callable[..., ImageService],
    token_registry: Registry,
    tokens: TokenServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    service = make_service()
    await service.pull(f"{token_registry.host}/test/private:1", RegistryAuth(USER, PASSWORD))
    await service.pull(
        f"{token_registry.host}/test/public:1", RegistryAuth(identity_token=REFRESH)
    )
    assert PASSWORD not in caplog.text
    assert REFRESH not in caplog.text
    for token in tokens.issued:
        assert token not in caplog.text
