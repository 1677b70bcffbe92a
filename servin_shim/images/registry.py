"""Client of the OCI distribution API: manifest resolution, platform choice and blob download.

One ``RegistryClient`` talks to one registry endpoint for one pull. It speaks plain HTTP to
loopback addresses and ``localhost``. A configured insecure registry gets HTTPS without
certificate verification, and plain HTTP when the TLS connection fails. Every other host gets
verified HTTPS. The client handles 401 challenges with HTTP Basic or the bearer token flow of
the distribution spec (see ``auth.py``). Credentials go only to the registry endpoint they were
given for, and to the token realm that endpoint names when the realm is HTTPS or loopback.

Blob downloads check size and digest while streaming. Connection resets, 5xx and 429 responses
are retried with exponential backoff (honouring Retry-After), and a retry resumes the partial
download with a Range request when the registry supports it.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import ipaddress
import json
import logging
import platform
import random
import re
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from servin_shim.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServinError,
    Unauthenticated,
    Unavailable,
)
from servin_shim.images.auth import RegistryAuth, TokenCache, TokenRequest, fetch_token
from servin_shim.images.content import BlobWriter, ContentStore, digest_hex
from servin_shim.images.reference import Reference

log = logging.getLogger(__name__)

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
_ACCEPTED_MANIFEST_TYPES = (
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
)
ACCEPT_MANIFESTS = ", ".join(_ACCEPTED_MANIFEST_TYPES)

# Manifests are small JSON documents, so the cap only stops a broken registry from filling memory.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_REDIRECTS = 5
# Attempts per request before a transient failure fails the pull, and the backoff bounds.
MAX_ATTEMPTS = 5
BACKOFF_FIRST_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 10.0
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True)
class Platform:
    """An OS, architecture and architecture variant as used in image indexes."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def matches(self, other: Platform) -> bool:
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and _normal_variant(self.architecture, self.variant)
            == _normal_variant(other.architecture, other.variant)
        )


def _normal_variant(architecture: str, variant: str) -> str:
    # An index may leave the variant out where there is only one: arm64 means arm64/v8.
    if architecture == "arm64" and variant == "":
        return "v8"
    if architecture == "amd64" and variant == "":
        return "v1"
    return variant


def host_platform() -> Platform:
    """Return the platform of this machine in the names that image indexes use."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return Platform("linux", "amd64")
    if machine in ("aarch64", "arm64"):
        return Platform("linux", "arm64", "v8")
    if machine.startswith("armv7"):
        return Platform("linux", "arm", "v7")
    return Platform("linux", machine)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor from a manifest or index."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    # Other locations of the blob; non-distributable (foreign) layers name them.
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        if not isinstance(data, dict):
            raise InvalidArgument(f"invalid descriptor in {where}: expected an object")
        digest = data.get("digest")
        size = data.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"invalid descriptor in {where}: missing digest or size")
        digest_hex(digest)
        plat = data.get("platform")
        parsed = None
        if isinstance(plat, dict):
            parsed = Platform(
                str(plat.get("os", "")),
                str(plat.get("architecture", "")),
                str(plat.get("variant", "")),
            )
        urls = data.get("urls")
        if urls is not None and (
            not isinstance(urls, list) or not all(isinstance(u, str) for u in urls)
        ):
            raise InvalidArgument(f"invalid descriptor in {where}: 'urls' is not a list of strings")
        return cls(str(data.get("mediaType", "")), digest, size, parsed, tuple(urls or ()))


@dataclass
class ResolvedImage:
    """The result of resolving a reference: the chosen image manifest and its blobs."""

    digest: str  # digest of what the reference names: an index or a manifest
    manifest_digest: str  # digest of the platform manifest that was chosen
    documents: dict[str, bytes]  # digest -> body of the index (if any) and the manifest
    config: Descriptor
    layers: list[Descriptor]


def is_loopback_host(host: str) -> bool:
    """Return True for ``localhost`` and 127.0.0.0/8 or ::1, with or without a port."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def is_insecure_host(host: str, insecure_registries: Collection[str] = ()) -> bool:
    """Return True if ``host`` (with optional port) may be reached without verified TLS."""
    if host in insecure_registries or is_loopback_host(host):
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in insecure_registries


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    default_port = 443 if url.scheme == "https" else 80
    return (url.scheme, url.host, url.port or default_port)


class RegistryClient:
    """Client for one registry endpoint, used for one pull (one repository)."""

    def __init__(
        self,
        host: str,
        *,
        insecure_registries: Collection[str] = (),
        auth: RegistryAuth | None = None,
        token_cache: TokenCache | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        platform: Platform | None = None,
        scheme: str | None = None,
    ) -> None:
        """Prepare a client for ``host``; ``scheme`` forces http or https (a mirror URL's)."""
        self.host = host
        self.insecure_registries = frozenset(insecure_registries)
        insecure = is_insecure_host(host, insecure_registries)
        if scheme is None:
            scheme = "http" if is_loopback_host(host) else "https"
        self.base_url = httpx.URL(f"{scheme}://{host}")
        # An insecure registry that refuses TLS is retried once over plain HTTP.
        self._may_downgrade = scheme == "https" and insecure
        self.auth = auth
        self.platform = platform or host_platform()
        self._tokens = token_cache or TokenCache()
        self._authorization: str | None = None
        if auth is not None and auth.registry_token:
            self._authorization = f"Bearer {auth.registry_token}"
        options: dict[str, Any] = {
            # The read timeout bounds one stalled read; the image service's progress timeout
            # bounds the pull as a whole.
            "timeout": httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            "follow_redirects": False,
            "transport": transport,
            # Blobs are checked byte for byte, so no transfer encoding may alter them.
            "headers": {"Accept-Encoding": "identity", "User-Agent": "servin-shim"},
        }
        self._client = httpx.AsyncClient(verify=not insecure, **options)
        # Only the listed registry itself skips certificate checks: its token realm and the
        # storage hosts it redirects to are verified like any other host.
        self._verified = httpx.AsyncClient(verify=True, **options) if insecure else self._client

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._verified is not self._client:
            await self._verified.aclose()

    def _client_for(self, url: httpx.URL) -> httpx.AsyncClient:
        """Return the client for ``url``: unverified TLS only for the registry's own host."""
        if url.host == self.base_url.host and url.port == self.base_url.port:
            return self._client
        return self._verified

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- manifests -------------------------------------------------------------------------

    async def resolve(self, ref: Reference) -> ResolvedImage:
        """Fetch the manifest ``ref`` names and, for an index, the one for this platform."""
        media_type, body, digest = await self.get_manifest(ref.repository, ref.manifest_reference)
        if ref.digest and digest != ref.digest:
            raise FailedPrecondition(
                f"manifest digest mismatch for {ref}: registry {self.host} sent {digest}"
            )
        documents = {digest: body}
        document = _parse_json(body, f"manifest of {ref}")
        manifest_digest = digest
        if media_type in INDEX_TYPES:
            chosen = self._choose_platform(ref, document)
            media_type, body, manifest_digest = await self.get_manifest(
                ref.repository, chosen.digest
            )
            if manifest_digest != chosen.digest or len(body) != chosen.size:
                raise FailedPrecondition(
                    f"manifest {chosen.digest} of {ref} does not match its index entry; "
                    f"registry {self.host} sent {manifest_digest} with {len(body)} bytes"
                )
            if media_type in INDEX_TYPES:
                raise InvalidArgument(f"image {ref} has a nested index, which is not supported")
            documents[manifest_digest] = body
            document = _parse_json(body, f"manifest {manifest_digest} of {ref}")
        config, layers = _check_image_manifest(ref, document)
        return ResolvedImage(digest, manifest_digest, documents, config, layers)

    async def get_manifest(self, repository: str, reference: str) -> tuple[str, bytes, str]:
        """Return media type, body and sha256 digest of a manifest or index."""
        url = self.base_url.join(f"/v2/{repository}/manifests/{reference}")
        # A digest follows the name after "@", a tag after ":", as in the reference grammar.
        separator = "@" if reference.startswith("sha256:") else ":"
        what = f"manifest {repository}{separator}{reference}"
        attempt = 0
        while True:
            attempt += 1
            try:
                data, header_type = await self._get_manifest_once(url, repository, what)
                break
            except _TransientError as exc:
                await self._backoff(attempt, exc, what)
        document = _parse_json(data, what)
        media_type = str(document.get("mediaType") or header_type)
        if media_type in MEDIA_DOCKER_SCHEMA1 or document.get("schemaVersion") == 1:
            raise InvalidArgument(
                f"image {self.host}/{repository}{separator}{reference} uses Docker manifest "
                "schema 1, which is not supported; push it again with a current Docker or as "
                "an OCI image"
            )
        if media_type not in INDEX_TYPES and media_type not in MANIFEST_TYPES:
            # Some registries omit mediaType in the body, so the fields present decide.
            media_type = MEDIA_OCI_INDEX if "manifests" in document else MEDIA_OCI_MANIFEST
        return media_type, data, "sha256:" + hashlib.sha256(data).hexdigest()

    async def _get_manifest_once(
        self, url: httpx.URL, repository: str, what: str
    ) -> tuple[bytes, str]:
        response = await self._send("GET", url, repository, {"Accept": ACCEPT_MANIFESTS})
        try:
            self._check_status(response, what)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > MAX_MANIFEST_BYTES:
                    raise InvalidArgument(
                        f"{what} from {self.host} is larger than {MAX_MANIFEST_BYTES} bytes"
                    )
        except httpx.TransportError as exc:
            raise _TransientError(f"download of {what} from {self.host} failed: {exc!r}") from exc
        finally:
            await response.aclose()
        header_type = response.headers.get("content-type", "").split(";")[0].strip()
        return bytes(body), header_type

    def _choose_platform(self, ref: Reference, index: dict[str, Any]) -> Descriptor:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"invalid index of {ref}: 'manifests' is not a list")
        available: list[str] = []
        for entry in entries:
            descriptor = Descriptor.from_json(entry, f"index of {ref}")
            if descriptor.platform is None:
                continue
            available.append(str(descriptor.platform))
            if descriptor.platform.matches(self.platform):
                return descriptor
        raise NotFound(
            f"image {ref} has no manifest for platform {self.platform}; "
            f"available: {', '.join(available) or 'none'}"
        )

    # --- blobs -----------------------------------------------------------------------------

    async def fetch_blob(
        self,
        repository: str,
        descriptor: Descriptor,
        store: ContentStore,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Download a blob into ``store``, checking size and digest while it arrives.

        A descriptor with ``urls`` (a non-distributable layer) is fetched from those URLs
        first, without credentials, and from the registry when none of them serves it, as
        containerd does. ``progress`` is called with the size of every received chunk.
        """
        with store.writer(descriptor.digest, descriptor.size) as writer:
            source = await self._fetch_from_urls(descriptor, writer, progress)
            if source is None:
                url = self.base_url.join(f"/v2/{repository}/blobs/{descriptor.digest}")
                await self._download(url, repository, descriptor, writer, progress)
                source = self.host
            path = writer.commit()
        log.info(
            "blob fetched registry=%s source=%s digest=%s size=%d",
            self.host,
            source,
            descriptor.digest,
            descriptor.size,
        )
        return path

    async def _fetch_from_urls(
        self,
        descriptor: Descriptor,
        writer: BlobWriter,
        progress: Callable[[int], None] | None,
    ) -> str | None:
        for raw in descriptor.urls:
            url = httpx.URL(raw)
            if url.scheme not in ("http", "https"):
                log.info("skipping blob url with unsupported scheme url=%s", raw)
                continue
            try:
                await self._download(url, None, descriptor, writer, progress)
            except (NotFound, Unavailable, Unauthenticated) as exc:
                log.warning(
                    "blob url failed, trying the next source digest=%s url_host=%s error=%s",
                    descriptor.digest,
                    url.host,
                    exc,
                )
                writer.reset()
                continue
            return str(url.copy_with(query=None))
        return None

    async def _download(
        self,
        url: httpx.URL,
        repository: str | None,
        descriptor: Descriptor,
        writer: BlobWriter,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Stream ``url`` into ``writer``, retrying transient failures and resuming with Range."""
        what = f"blob {descriptor.digest}"
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._download_once(url, repository, descriptor, writer, progress)
                return
            except _TransientError as exc:
                await self._backoff(attempt, exc, what, resume_at=writer.written)

    async def _download_once(
        self,
        url: httpx.URL,
        repository: str | None,
        descriptor: Descriptor,
        writer: BlobWriter,
        progress: Callable[[int], None] | None,
    ) -> None:
        headers: dict[str, str] = {}
        offset = writer.written
        if 0 < offset < descriptor.size:
            headers["Range"] = f"bytes={offset}-"
        what = f"blob {descriptor.digest}" + (f" of {repository}" if repository else "")
        if repository is None:
            response = await self._follow("GET", url, headers)
        else:
            response = await self._send("GET", url, repository, headers)
        try:
            if response.status_code == 206 and offset:
                _check_content_range(response, offset, descriptor, self.host)
            else:
                self._check_status(response, what)
                if offset:
                    # The server ignored the Range header and sends the whole blob again.
                    log.info("registry ignored range, restarting blob digest=%s", descriptor.digest)
                    writer.reset()
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) != descriptor.size:
                    raise FailedPrecondition(
                        f"{what} has {length} bytes at {self.host}, but its manifest lists "
                        f"{descriptor.size}"
                    )
            # No chunk size: a buffered chunk would be lost when the connection drops, and the
            # resume must start after the last byte that reached the file.
            async for chunk in response.aiter_raw():
                writer.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        except httpx.TransportError as exc:
            raise _TransientError(
                f"download of {what} from {url.host} failed after {writer.written} of "
                f"{descriptor.size} bytes: {exc!r}"
            ) from exc
        finally:
            await response.aclose()
        if writer.written < descriptor.size:
            raise _TransientError(
                f"download of {what} from {url.host} ended after {writer.written} of "
                f"{descriptor.size} bytes"
            )

    async def _backoff(
        self, attempt: int, exc: _TransientError, what: str, resume_at: int = 0
    ) -> None:
        """Sleep before the next attempt, or raise Unavailable after the last one."""
        if attempt >= MAX_ATTEMPTS:
            raise Unavailable(f"{exc}; gave up after {attempt} attempts") from exc
        delay = min(BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1), BACKOFF_MAX_SECONDS)
        delay *= random.uniform(0.8, 1.2)
        if exc.retry_after is not None:
            delay = min(max(delay, exc.retry_after), BACKOFF_MAX_SECONDS * 6)
        log.warning(
            "registry request failed, retrying registry=%s what=%s attempt=%d delay=%.2f "
            "resume_at=%d error=%s",
            self.host,
            what,
            attempt,
            delay,
            resume_at,
            exc,
        )
        await asyncio.sleep(delay)

    # --- HTTP, redirects and authentication ------------------------------------------------

    async def _send(
        self, method: str, url: httpx.URL, repository: str, headers: dict[str, str]
    ) -> httpx.Response:
        """Send a request, handle one 401 challenge, and return the streaming response."""
        response = await self._follow(method, url, headers)
        if response.status_code != 401 or _origin(response.url) != _origin(self.base_url):
            return response
        challenge = response.headers.get("www-authenticate", "")
        await response.aclose()
        await self._handle_challenge(challenge, repository)
        url = url.copy_with(scheme=self.base_url.scheme)
        return await self._follow(method, url, headers)

    async def _follow(self, method: str, url: httpx.URL, headers: dict[str, str]) -> httpx.Response:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            # Credentials stay with the registry endpoint: a redirect to storage on another
            # host (or to plain HTTP) goes without the Authorization header.
            if self._authorization and _origin(current) == _origin(self.base_url):
                request_headers["Authorization"] = self._authorization
            client = self._client_for(current)
            request = client.build_request(method, current, headers=request_headers)
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                # A refused or failed connection is not retried: a host that is down stays
                # down for seconds, and a mirror list should move on at once.
                if not self._downgrade(current):
                    raise Unavailable(self._connect_error_message(current, exc)) from exc
                current = current.copy_with(scheme="http")
                continue
            except httpx.TransportError as exc:
                raise _TransientError(
                    f"request to registry {self.host} at {current.copy_with(query=None)} "
                    f"failed: {exc!r}"
                ) from exc
            location = response.headers.get("location")
            if response.status_code not in _REDIRECT_CODES or not location:
                return response
            await response.aclose()
            current = current.join(location)
        raise Unavailable(f"registry {self.host} redirected more than {MAX_REDIRECTS} times")

    def _connect_error_message(self, url: httpx.URL, exc: httpx.ConnectError) -> str:
        """Describe a failed connection, and for a TLS failure how to trust the registry."""
        where = f"registry {self.host} at {url.copy_with(query=None)}"
        cause = _ssl_cause(exc)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"could not verify the TLS certificate of {where}: {cause.verify_message}; "
                "install the CA certificate that signed it on this host, or add "
                f"{self.host} to insecureRegistries to skip verification"
            )
        if cause is not None:
            return (
                f"TLS handshake with {where} failed: {cause}; if the registry serves only "
                f"plain HTTP or an untrusted certificate, add {self.host} to insecureRegistries"
            )
        return f"could not reach {where}: {exc!r}"

    def _downgrade(self, current: httpx.URL) -> bool:
        """Switch an insecure registry from HTTPS to HTTP after a failed TLS connection."""
        if not self._may_downgrade or _origin(current) != _origin(self.base_url):
            return False
        self._may_downgrade = False
        self.base_url = self.base_url.copy_with(scheme="http")
        log.warning(
            "TLS connection to insecure registry failed, using plain HTTP registry=%s", self.host
        )
        return True

    async def _handle_challenge(self, challenge: str, repository: str) -> None:
        scheme, _, rest = challenge.strip().partition(" ")
        params = {
            m.group(1).lower(): m.group(2) or m.group(3) or ""
            for m in _CHALLENGE_PARAM_RE.finditer(rest)
        }
        if scheme.lower() == "basic":
            if self.auth is None or not self.auth.username:
                raise Unauthenticated(
                    f"registry {self.host} requires authentication for {repository}; "
                    "pass a username and password with the pull"
                )
            self._authorization = self.auth.basic_header()
            return
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise Unauthenticated(
                f"registry {self.host} sent an unsupported authentication challenge "
                f"{scheme or '(empty)'!r} for {repository}"
            )
        realm = httpx.URL(params["realm"])
        if realm.scheme not in ("http", "https"):
            raise Unauthenticated(
                f"registry {self.host} named a token realm with unsupported scheme {realm.scheme!r}"
            )
        # The realm receives the credentials only over HTTPS or on a loopback or insecure host.
        send_credentials = realm.scheme == "https" or is_insecure_host(
            realm.netloc.decode(), self.insecure_registries
        )
        request = TokenRequest(
            registry=self.host,
            realm=realm,
            service=params.get("service", ""),
            repository=repository,
            send_credentials=send_credentials,
        )
        token = await fetch_token(self._client_for(realm), request, self.auth, self._tokens)
        self._authorization = f"Bearer {token}"

    def _check_status(self, response: httpx.Response, what: str) -> None:
        code = response.status_code
        if code == 200:
            return
        where = f"{what} at registry {self.host}"
        if code == 401:
            if self.auth is None or not self.auth.has_credentials:
                raise Unauthenticated(
                    f"registry {self.host} requires authentication for {what} (HTTP 401); "
                    "pass credentials with the pull"
                )
            raise Unauthenticated(
                f"authentication to registry {self.host} failed: the registry rejected the "
                f"credentials for {what} (HTTP 401); check the username and password"
            )
        if code == 403:
            raise Unauthenticated(f"access to {where} denied (HTTP 403)")
        if code == 404:
            raise NotFound(f"{where} not found (HTTP 404)")
        if code in _RETRY_STATUS:
            raise _TransientError(
                f"{where} failed with HTTP {code}",
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if code >= 500:
            raise Unavailable(f"{where}: server error (HTTP {code})")
        raise ServinError(f"{where}: unexpected HTTP status {code}")


class _TransientError(Unavailable):
    """A failure worth retrying: connection reset, truncated body, 5xx or 429."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """Return the ssl error behind an httpx error, which wraps it in httpcore's error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _retry_after(value: str | None) -> float | None:
    """Parse a Retry-After header: seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _check_content_range(
    response: httpx.Response, offset: int, descriptor: Descriptor, host: str
) -> None:
    header = response.headers.get("content-range", "")
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", header)
    if not match or int(match.group(1)) != offset:
        raise FailedPrecondition(
            f"registry {host} responded to a range request for blob {descriptor.digest} from byte "
            f"{offset} with Content-Range {header!r}"
        )


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return document


def _check_image_manifest(
    ref: Reference, manifest: dict[str, Any]
) -> tuple[Descriptor, list[Descriptor]]:
    """Return config and layer descriptors of an image manifest, or raise for anything else."""
    where = f"manifest of {ref}"
    config = Descriptor.from_json(manifest.get("config"), where)
    artifact_type = manifest.get("artifactType")
    if config.media_type not in CONFIG_TYPES or artifact_type:
        kind = artifact_type or config.media_type or "(none)"
        raise FailedPrecondition(
            f"{ref} is not a container image: its artifact or config type is {kind!r}; "
            "only OCI and Docker images can run"
        )
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument(f"invalid {where}: 'layers' is not a list")
    layers = [Descriptor.from_json(item, where) for item in raw_layers]
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise FailedPrecondition(
                f"layer {layer.digest} of {ref} has unsupported media type {layer.media_type!r}"
            )
    return config, layers
