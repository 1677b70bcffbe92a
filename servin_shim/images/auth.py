"""Registry credentials and the token flows of the distribution auth spec.

``RegistryAuth`` carries what a PullImage request brings: username and password, an identity
(OAuth2 refresh) token, or a ready registry token. ``TokenIssuer`` answers a ``Bearer``
challenge: it asks the realm for a pull-scoped token, with HTTP Basic credentials (GET) or by
exchanging the identity token (POST, ``grant_type=refresh_token``), and caches the token until
it expires. Secrets never reach a log line, a file or a host other than the registry and the
realm that registry names.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from servin_shim.errors import InvalidArgument, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

# The distribution token spec says a token without expires_in lives 60 seconds.
DEFAULT_TOKEN_SECONDS = 60
# client_id is required by the OAuth2 token endpoint; it names the client, not a user.
OAUTH_CLIENT_ID = "servin-shim"


@dataclass(frozen=True, repr=False)
class RegistryAuth:
    """Credentials for one pull: username and password, an identity token or a registry token.

    ``server_address`` is the registry the credentials belong to. When set, the pull sends the
    credentials only to that registry.
    """

    username: str = ""
    password: str = ""
    registry_token: str = ""
    identity_token: str = ""
    server_address: str = ""

    @classmethod
    def from_encoded(cls, auth: str, server_address: str = "") -> RegistryAuth:
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
        return cls(username=username, password=password, server_address=server_address)

    @property
    def has_credentials(self) -> bool:
        """True when there is something to authenticate with."""
        return bool(self.username or self.registry_token or self.identity_token)

    def fingerprint(self) -> str:
        """Return a hash that distinguishes credentials without revealing them."""
        digest = hashlib.sha256()
        for part in (self.username, self.password, self.registry_token, self.identity_token):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:16]

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:
        # Passwords and tokens must never reach a log line through repr().
        return (
            f"RegistryAuth(username={self.username!r}, server_address={self.server_address!r}, "
            "password=***, registry_token=***, identity_token=***)"
        )


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


@dataclass
class TokenRequest:
    """One bearer challenge to answer: realm, service and the repository to pull."""

    registry: str
    realm: httpx.URL
    service: str
    repository: str
    # False when the realm may not see the credentials (plain HTTP to a host that is not
    # loopback or configured insecure). The request is then anonymous.
    send_credentials: bool

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"


async def fetch_token(
    client: httpx.AsyncClient,
    request: TokenRequest,
    auth: RegistryAuth | None,
    cache: TokenCache,
) -> str:
    """Return a pull token for ``request``, from the cache or from the realm."""
    identity = auth.fingerprint() if auth else ""
    key = (str(request.realm), request.service, request.scope, identity)
    cached = cache.get(key)
    if cached:
        return cached

    usable = auth if auth is not None and request.send_credentials else None
    if auth is not None and auth.has_credentials and usable is None:
        log.warning(
            "token realm is plain HTTP on a remote host, requesting an anonymous token "
            "registry=%s realm=%s",
            request.registry,
            request.realm.copy_with(query=None),
        )
    if usable is not None and usable.identity_token:
        response = await _post_refresh_token(client, request, usable.identity_token)
    else:
        response = await _get_token(client, request, usable)
    data = _token_response(response, request, usable)
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token:
        raise Unauthenticated(
            f"authentication to registry {request.registry} failed: token server "
            f"{request.realm.host} returned no token"
        )
    seconds = data.get("expires_in")
    if not isinstance(seconds, int | float) or seconds <= 0:
        seconds = DEFAULT_TOKEN_SECONDS
    cache.put(key, token, float(seconds))
    log.debug(
        "registry token issued registry=%s realm_host=%s scope=%s seconds=%s",
        request.registry,
        request.realm.host,
        request.scope,
        seconds,
    )
    return token


async def _get_token(
    client: httpx.AsyncClient, request: TokenRequest, auth: RegistryAuth | None
) -> httpx.Response:
    headers: dict[str, str] = {}
    if auth is not None and auth.username:
        headers["Authorization"] = auth.basic_header()
    query = {"scope": request.scope}
    if request.service:
        query["service"] = request.service
    if auth is not None and auth.username:
        query["account"] = auth.username
    url = request.realm.copy_merge_params(query)
    try:
        return await client.get(url, headers=headers)
    except httpx.TransportError as exc:
        raise Unavailable(
            f"could not reach token server {request.realm.host} of registry "
            f"{request.registry}: {exc!r}"
        ) from exc


async def _post_refresh_token(
    client: httpx.AsyncClient, request: TokenRequest, refresh_token: str
) -> httpx.Response:
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "service": request.service,
        "scope": request.scope,
        "client_id": OAUTH_CLIENT_ID,
    }
    try:
        return await client.post(request.realm, data=form)
    except httpx.TransportError as exc:
        raise Unavailable(
            f"could not reach token server {request.realm.host} of registry "
            f"{request.registry}: {exc!r}"
        ) from exc


def _token_response(
    response: httpx.Response, request: TokenRequest, auth: RegistryAuth | None
) -> dict[str, Any]:
    code = response.status_code
    if code in (400, 401, 403):
        if auth is None or not auth.has_credentials:
            raise Unauthenticated(
                f"registry {request.registry} requires authentication for {request.repository}: "
                f"token server {request.realm.host} refused an anonymous token (HTTP {code}); "
                "pass credentials with the pull"
            )
        raise Unauthenticated(
            f"authentication to registry {request.registry} failed: token server "
            f"{request.realm.host} rejected the credentials for {request.repository} "
            f"(HTTP {code}); check the username and password"
        )
    if code != 200:
        raise Unavailable(
            f"token server {request.realm.host} of registry {request.registry} returned "
            f"HTTP {code} for {request.repository}"
        )
    try:
        data = response.json()
    except ValueError as exc:
        raise Unavailable(
            f"token server {request.realm.host} of registry {request.registry} returned "
            f"invalid JSON: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise Unavailable(
            f"token server {request.realm.host} of registry {request.registry} returned "
            "a token response that is not a JSON object"
        )
    return data
