"""Pulls from a real docker-registry over HTTPS with a self-signed certificate.

The image service speaks plain HTTP to ``localhost`` and loopback addresses, so these tests reach
the registry by another name that /etc/hosts maps to loopback (``ip6-localhost`` on Debian).
A ``TcpTap`` listens on that address and relays each connection to the registry on 127.0.0.1.
It records the bytes each client sends, so a test can check whether a connection began with a
TLS handshake or with plain HTTP, and whether credentials crossed in clear text.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import httpx
import pytest

from servin_shim.errors import Unavailable
from servin_shim.images.auth import RegistryAuth
from servin_shim.images.registry import RegistryClient
from servin_shim.images.service import ImageService
from tests.support.imagebuild import Image, push_image
from tests.support.registry import Registry

log = logging.getLogger(__name__)

HOSTS_FILE = Path("/etc/hosts")
# Debian maps ip6-localhost to ::1. Without it, another /etc/hosts alias of loopback will do.
PREFERRED_NAME = "ip6-localhost"
REPOSITORY, TAG = "test/busybox", "1"
USER, PASSWORD = "tester", "tls-horse-9"
# The first byte of a TLS record that carries a handshake (the ClientHello).
TLS_HANDSHAKE = 0x16


def loopback_alias() -> tuple[str, str] | None:
    """Return a name and its address from /etc/hosts that the image service treats as remote.

    Only /etc/hosts is read, because a name missing there would go to the DNS server.
    """
    addresses: dict[str, set[str]] = {}
    for line in HOSTS_FILE.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            addresses.setdefault(name, set()).add(fields[0])
    candidates = [PREFERRED_NAME, *sorted(set(addresses) - {PREFERRED_NAME})]
    for name in candidates:
        found = addresses.get(name, set())
        # One address keeps the connection target certain. "localhost" is plain HTTP by rule.
        if name == "localhost" or len(found) != 1:
            continue
        (address,) = found
        try:
            if ipaddress.ip_address(address).is_loopback:
                return name, address
        except ValueError:
            continue
    return None


class TcpTap:
    """A TCP relay on ``address`` to ``upstream`` that records the bytes clients send."""

    def __init__(self, address: str, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        # The client-to-server bytes of each connection, in order of arrival.
        self.sent: list[bytearray] = []
        tap = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                tap._relay(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

        self._server = Server((address, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        self.sent.clear()

    def plaintext_connections(self) -> list[bytes]:
        """Return the opening bytes of every connection that did not start a TLS handshake."""
        return [bytes(data[:40]) for data in self.sent if data and data[0] != TLS_HANDSHAKE]

    def _relay(self, client: socket.socket) -> None:
        received = bytearray()
        self.sent.append(received)
        upstream = socket.create_connection(self.upstream)
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in selector.select(timeout=30):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    chunk = source.recv(65536)
                    if not chunk:
                        return
                    if source is client:
                        received.extend(chunk)
                    key.data.sendall(chunk)
        except OSError as exc:
            log.debug("tap connection ended error=%s", exc)
        finally:
            selector.close()
            upstream.close()


@pytest.fixture(scope="module")
def alias() -> tuple[str, str]:
    found = loopback_alias()
    if found is None:
        pytest.skip(
            f"no name other than localhost maps to a single loopback address in {HOSTS_FILE}; "
            f"add '::1 {PREFERRED_NAME}' there to run the TLS pull tests"
        )
    return found


def make_tap(registry: Registry, address: str) -> TcpTap:
    return TcpTap(address, ("127.0.0.1", registry.port))


@pytest.fixture(scope="module")
def tls_tap(alias: tuple[str, str], busybox: Image) -> Iterator[TcpTap]:
    """A tap on the alias address in front of an HTTPS registry that contains busybox."""
    with Registry(tls=True) as registry:
        push_image(registry.host, REPOSITORY, TAG, busybox, https=True)
        with make_tap(registry, alias[1]) as tap:
            yield tap


@pytest.fixture(scope="module")
def tls_basic_tap(alias: tuple[str, str], busybox: Image) -> Iterator[TcpTap]:
    """Like ``tls_tap``, but the registry requires HTTP Basic credentials."""
    with Registry(users={USER: PASSWORD}, tls=True) as registry:
        push_image(registry.host, REPOSITORY, TAG, busybox, auth=(USER, PASSWORD), https=True)
        with make_tap(registry, alias[1]) as tap:
            yield tap


@pytest.fixture(scope="module")
def plain_basic_tap(alias: tuple[str, str], busybox: Image) -> Iterator[TcpTap]:
    """A tap on the alias address in front of a plain-HTTP registry with Basic auth."""
    with Registry(users={USER: PASSWORD}) as registry:
        push_image(registry.host, REPOSITORY, TAG, busybox, auth=(USER, PASSWORD))
        with make_tap(registry, alias[1]) as tap:
            yield tap


def reference(alias: tuple[str, str], tap: TcpTap) -> str:
    return f"{alias[0]}:{tap.port}/{REPOSITORY}:{TAG}"


def leaked_credentials(tap: TcpTap) -> list[bytes]:
    """Return the connections whose clear bytes contain the password or a Basic header."""
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    return [bytes(data[:40]) for data in tap.sent if PASSWORD.encode() in data or basic in data]


async def test_tls_insecure_pull(
    make_service: Callable[..., ImageService],
    alias: tuple[str, str],
    tls_tap: TcpTap,
    busybox: Image,
) -> None:
    tls_tap.reset()
    host = f"{alias[0]}:{tls_tap.port}"
    service = make_service(insecure_registries=[host])
    image_id = await service.pull(reference(alias, tls_tap))
    assert image_id == busybox.id
    assert tls_tap.sent
    assert tls_tap.plaintext_connections() == []


async def test_tls_untrusted_rejected(
    make_service: Callable[..., ImageService], alias: tuple[str, str], tls_tap: TcpTap
) -> None:
    tls_tap.reset()
    host = f"{alias[0]}:{tls_tap.port}"
    service = make_service()
    with pytest.raises(Unavailable) as error:
        await service.pull(reference(alias, tls_tap))
    message = str(error.value)
    assert host in message
    assert "certificate" in message
    assert "insecureRegistries" in message
    assert tls_tap.plaintext_connections() == []


async def test_tls_untrusted_no_credentials(
    make_service: Callable[..., ImageService], alias: tuple[str, str], tls_basic_tap: TcpTap
) -> None:
    tls_basic_tap.reset()
    service = make_service()
    with pytest.raises(Unavailable):
        await service.pull(reference(alias, tls_basic_tap), RegistryAuth(USER, PASSWORD))
    assert tls_basic_tap.plaintext_connections() == []


async def test_tls_insecure_basic_auth(
    make_service: Callable[..., ImageService],
    alias: tuple[str, str],
    tls_basic_tap: TcpTap,
    busybox: Image,
) -> None:
    tls_basic_tap.reset()
    host = f"{alias[0]}:{tls_basic_tap.port}"
    service = make_service(insecure_registries=[host])
    image_id = await service.pull(reference(alias, tls_basic_tap), RegistryAuth(USER, PASSWORD))
    assert image_id == busybox.id
    assert tls_basic_tap.plaintext_connections() == []
    assert leaked_credentials(tls_basic_tap) == []


async def test_plain_registry_not_listed(
    make_service: Callable[..., ImageService], alias: tuple[str, str], plain_basic_tap: TcpTap
) -> None:
    # A registry that speaks only plain HTTP must not get a downgraded request, nor the password.
    plain_basic_tap.reset()
    host = f"{alias[0]}:{plain_basic_tap.port}"
    service = make_service()
    with pytest.raises(Unavailable) as error:
        await service.pull(reference(alias, plain_basic_tap), RegistryAuth(USER, PASSWORD))
    message = str(error.value)
    assert plain_basic_tap.sent
    assert plain_basic_tap.plaintext_connections() == []
    assert leaked_credentials(plain_basic_tap) == []
    assert host in message
    assert "TLS" in message
    assert "insecureRegistries" in message


async def test_plain_registry_listed(
    make_service: Callable[..., ImageService],
    alias: tuple[str, str],
    plain_basic_tap: TcpTap,
    busybox: Image,
) -> None:
    # Listing the host allows the fallback to plain HTTP, and the credentials go with it.
    plain_basic_tap.reset()
    host = f"{alias[0]}:{plain_basic_tap.port}"
    service = make_service(insecure_registries=[host])
    image_id = await service.pull(reference(alias, plain_basic_tap), RegistryAuth(USER, PASSWORD))
    assert image_id == busybox.id
    assert plain_basic_tap.plaintext_connections() != []
    assert leaked_credentials(plain_basic_tap) != []


async def test_insecure_host_only_skips_its_own_checks() -> None:
    client = RegistryClient("mirror.internal:5000", insecure_registries=["mirror.internal:5000"])
    try:
        own = client._client_for(httpx.URL("https://mirror.internal:5000/v2/"))
        realm = client._client_for(httpx.URL("https://auth.example/token"))
        storage = client._client_for(httpx.URL("https://mirror.internal:9000/blob"))

        # Certificate checks are skipped for the listed host and port alone.
        assert own is client._client
        assert realm is client._verified
        assert storage is client._verified
        assert realm is not own
    finally:
        await client.aclose()
