"""Client of the OCI distribution API: manifest resolution, platform choice and blob download.

One ``RegistryClient`` talks to one registry endpoint for one pull. It speaks plain HTTP to
loopback addresses, ``localhost`` and configured insecure registries, and HTTPS otherwise. It
handles 401 challenges with HTTP Basic or the bearer token flow of the distribution spec.
Credentials go only to the registry endpoint they were given for, and to the token realm that
endpoint names (only over HTTPS unless the realm is on the same endpoint).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import platform
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
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
from servin_shim.images.content import ContentStore, digest_hex
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
BLOB_CHUNK_BYTES = 1024 * 1024
# The distribution token spec says a token without expires_in lives 60 seconds.
DEFAULT_TOKEN_SECONDS = 60
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True, repr=False)
class RegistryAuth:
    """Credentials for one pull: username and password, or a ready bearer token."""

    username: str = ""
    password: str = ""
    registry_token: str = ""

    @classmethod
    def from_encoded(cls, auth: str) -> RegistryAuth:
        """Decode the base64 ``username:password`` form (the CRI AuthConfig ``auth`` field)."""
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(
                "invalid registry auth: expected base64 of username:password"
            ) from exc
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise InvalidArgument("invalid registry auth: expected base64 of username:password")
        return cls(username=username, password=password)

    def fingerprint(self) -> str:
        """Return a hash that distinguishes credentials without revealing them."""
        raw = f"{self.username}\0{self.password}\0{self.registry_token}".encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def __repr__(self) -> str:
        # Passwords and tokens must never reach a log line through repr().
        return f"RegistryAuth(username={self.username!r}, password=***, registry_token=***)"


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
        return cls(str(data.get("mediaType", "")), digest, size, parsed)


@dataclass
class ResolvedImage:
    """The result of resolving a reference: the chosen image manifest and its blobs."""

    digest: str  # digest of what the reference names: an index or a manifest
    manifest_digest: str  # digest of the platform manifest that was chosen
    documents: dict[str, bytes]  # digest -> body of the index (if any) and the manifest
    config: Descriptor
    layers: list[Descriptor]


@dataclass
class TokenCache:
    """Bearer tokens shared between pulls, keyed by realm, service, scope and credentials."""

    tokens: dict[tuple[str, str, str, str], tuple[str, float]] = field(default_factory=dict)

    def get(self, key: tuple[str, str, str, str]) -> str | None:
        entry = self.tokens.get(key)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def put(self, key: tuple[str, str, str, str], token: str, seconds: float) -> None:
        # Renew a little early so a token does not expire in the middle of a request.
        self.tokens[key] = (token, time.monotonic() + max(seconds - 10, 1))


def is_insecure_host(host: str, insecure_registries: Collection[str] = ()) -> bool:
    """Return True if ``host`` (with optional port) is spoken to over plain HTTP."""
    if host in insecure_registries:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name in insecure_registries:
        return True
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


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
    ) -> None:
        self.host = host
        scheme = "http" if is_insecure_host(host, insecure_registries) else "https"
        self.base_url = httpx.URL(f"{scheme}://{host}")
        self.auth = auth
        self.platform = platform or host_platform()
        self._tokens = token_cache or TokenCache()
        self._authorization: str | None = None
        if auth is not None and auth.registry_token:
            self._authorization = f"Bearer {auth.registry_token}"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            follow_redirects=False,
            transport=transport,
            # Blobs are checked byte for byte, so no transfer encoding may alter them.
            headers={"Accept-Encoding": "identity", "User-Agent": "servin-shim"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

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
        response = await self._send("GET", url, repository, {"Accept": ACCEPT_MANIFESTS})
        try:
            self._check_status(response, f"manifest {repository}:{reference}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > MAX_MANIFEST_BYTES:
                    raise InvalidArgument(
                        f"manifest {repository}:{reference} from {self.host} is larger than "
                        f"{MAX_MANIFEST_BYTES} bytes"
                    )
        finally:
            await response.aclose()
        data = bytes(body)
        header_type = response.headers.get("content-type", "").split(";")[0].strip()
        document = _parse_json(data, f"manifest {repository}:{reference}")
        media_type = str(document.get("mediaType") or header_type)
        if media_type in MEDIA_DOCKER_SCHEMA1 or document.get("schemaVersion") == 1:
            raise InvalidArgument(
                f"image {self.host}/{repository}:{reference} uses Docker manifest schema 1, "
                "which is not supported; push it again with a current Docker or as an OCI image"
            )
        if media_type not in INDEX_TYPES and media_type not in MANIFEST_TYPES:
            # Some registries omit mediaType in the body, so the fields present decide.
            media_type = MEDIA_OCI_INDEX if "manifests" in document else MEDIA_OCI_MANIFEST
        return media_type, data, "sha256:" + hashlib.sha256(data).hexdigest()

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
        self, repository: str, descriptor: Descriptor, store: ContentStore
    ) -> Path:
        """Download a blob into ``store``, checking size and digest while it arrives."""
        url = self.base_url.join(f"/v2/{repository}/blobs/{descriptor.digest}")
        # NOTE: a failed download is not retried or resumed; the whole pull fails.
        response = await self._send("GET", url, repository, {})
        try:
            self._check_status(response, f"blob {descriptor.digest} of {repository}")
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != descriptor.size:
                raise FailedPrecondition(
                    f"blob {descriptor.digest} of {repository} has {length} bytes at "
                    f"{self.host}, but its manifest says {descriptor.size}"
                )
            path = await store.ingest(
                descriptor.digest, descriptor.size, response.aiter_raw(BLOB_CHUNK_BYTES)
            )
        except httpx.TransportError as exc:
            raise Unavailable(
                f"download of blob {descriptor.digest} from {self.host} failed: {exc}"
            ) from exc
        finally:
            await response.aclose()
        log.info(
            "blob fetched registry=%s digest=%s size=%d",
            self.host,
            descriptor.digest,
            descriptor.size,
        )
        return path

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
        return await self._follow(method, url, headers)

    async def _follow(self, method: str, url: httpx.URL, headers: dict[str, str]) -> httpx.Response:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            # Credentials stay with the registry endpoint: a redirect to storage on another
            # host (or to plain HTTP) goes without the Authorization header.
            if self._authorization and _origin(current) == _origin(self.base_url):
                request_headers["Authorization"] = self._authorization
            request = self._client.build_request(method, current, headers=request_headers)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise Unavailable(
                    f"could not reach registry {self.host} at {current.copy_with(query=None)}: "
                    f"{exc!r}"
                ) from exc
            location = response.headers.get("location")
            if response.status_code not in _REDIRECT_CODES or not location:
                return response
            await response.aclose()
            current = current.join(location)
        raise Unavailable(f"registry {self.host} redirected more than {MAX_REDIRECTS} times")

    async def _handle_challenge(self, challenge: str, repository: str) -> None:
        scheme, _, rest = challenge.strip().partition(" ")
        params = {
            m.group(1).lower(): m.group(2) or m.group(3) or ""
            for m in _CHALLENGE_PARAM_RE.finditer(rest)
        }
        has_credentials = self.auth is not None and bool(self.auth.username)
        if scheme.lower() == "basic":
            if not has_credentials or self.auth is None:
                raise Unauthenticated(
                    f"registry {self.host} requires credentials for {repository}; "
                    "pass a username and password with the pull"
                )
            raw = f"{self.auth.username}:{self.auth.password}".encode()
            self._authorization = "Basic " + base64.b64encode(raw).decode()
            return
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise Unauthenticated(
                f"registry {self.host} sent an unsupported authentication challenge "
                f"{scheme or '(empty)'!r} for {repository}"
            )
        token = await self._fetch_token(params["realm"], params.get("service", ""), repository)
        self._authorization = f"Bearer {token}"

    async def _fetch_token(self, realm: str, service: str, repository: str) -> str:
        scope = f"repository:{repository}:pull"
        identity = self.auth.fingerprint() if self.auth else ""
        key = (realm, service, scope, identity)
        cached = self._tokens.get(key)
        if cached:
            return cached
        realm_url = httpx.URL(realm)
        headers: dict[str, str] = {}
        if self.auth is not None and self.auth.username:
            if realm_url.scheme == "https" or _origin(realm_url) == _origin(self.base_url):
                raw = f"{self.auth.username}:{self.auth.password}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
            else:
                log.warning(
                    "token realm is plain HTTP on another host, requesting an anonymous token "
                    "registry=%s realm=%s",
                    self.host,
                    realm_url.copy_with(query=None),
                )
        query = {"scope": scope}
        if service:
            query["service"] = service
        try:
            response = await self._client.get(realm_url.copy_merge_params(query), headers=headers)
        except httpx.TransportError as exc:
            raise Unavailable(f"could not reach token server {realm_url.host}: {exc!r}") from exc
        if response.status_code in (401, 403):
            raise Unauthenticated(
                f"token server {realm_url.host} rejected the credentials for {repository} "
                f"(HTTP {response.status_code})"
            )
        if response.status_code != 200:
            raise Unavailable(
                f"token server {realm_url.host} returned HTTP {response.status_code} "
                f"for {repository}"
            )
        data = _parse_json(response.content, f"token response from {realm_url.host}")
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise Unauthenticated(f"token server {realm_url.host} returned no token")
        seconds = data.get("expires_in")
        if not isinstance(seconds, int | float) or seconds <= 0:
            seconds = DEFAULT_TOKEN_SECONDS
        self._tokens.put(key, token, float(seconds))
        return token

    def _check_status(self, response: httpx.Response, what: str) -> None:
        code = response.status_code
        if code == 200:
            return
        where = f"{what} at registry {self.host}"
        if code == 401:
            if self.auth is None or not (self.auth.username or self.auth.registry_token):
                raise Unauthenticated(f"{where} requires credentials (HTTP 401)")
            raise Unauthenticated(f"registry {self.host} rejected the credentials for {what}")
        if code == 403:
            raise Unauthenticated(f"access to {where} denied (HTTP 403)")
        if code == 404:
            raise NotFound(f"{where} not found (HTTP 404)")
        if code == 429:
            raise Unavailable(f"{where}: too many requests (HTTP 429); retry later")
        if code >= 500:
            raise Unavailable(f"{where}: server error (HTTP {code})")
        raise ServinError(f"{where}: unexpected HTTP status {code}")


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
