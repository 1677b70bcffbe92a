"""The cache of pending streaming requests, keyed by the single-use token in their URL.

An Exec, Attach or PortForward RPC stores its validated request here and returns a URL that
carries the token. The client (kubelet's proxy) then connects to that URL. A token is valid
for one connection within ``ttl`` seconds, the rules kubelet's own streaming server follows.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from servin_shim.errors import ResourceExhausted

log = logging.getLogger(__name__)

#: Seconds a token stays valid after it was issued.
TOKEN_TTL = 60.0
#: Tokens issued and not used yet; more are rejected until some expire or are used.
MAX_IN_FLIGHT = 1000
#: Characters of a token: 6 random bytes give exactly 8 characters of unpadded base64url.
TOKEN_LENGTH = 8

T = TypeVar("T")


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()[:TOKEN_LENGTH]


class RequestCache(Generic[T]):
    """Requests by token, oldest first; each token can be consumed once before it expires."""

    def __init__(
        self,
        *,
        ttl: float = TOKEN_TTL,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._entries: OrderedDict[str, tuple[T, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def insert(self, request: T) -> str:
        """Store ``request`` and return its new token; raises ResourceExhausted when full."""
        self._expire()
        if len(self._entries) >= self.max_in_flight:
            raise ResourceExhausted(
                f"too many streaming requests in flight ({self.max_in_flight}): retry after "
                f"unused tokens expire in at most {self.ttl:.0f}s"
            )
        token = new_token()
        while token in self._entries:
            token = new_token()
        self._entries[token] = (request, self._clock() + self.ttl)
        return token

    def consume(self, token: str) -> T | None:
        """Remove and return the request of a live token, or None for an unknown or expired one."""
        entry = self._entries.pop(token, None)
        if entry is None:
            return None
        request, expires = entry
        if self._clock() >= expires:
            log.debug("streaming token expired token=%s", token)
            return None
        return request

    def _expire(self) -> None:
        now = self._clock()
        # Entries are in insertion order with one TTL, so the expired ones come first.
        while self._entries:
            token, (_, expires) = next(iter(self._entries.items()))
            if now < expires:
                break
            del self._entries[token]
