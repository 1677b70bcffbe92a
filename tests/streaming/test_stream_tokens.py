"""The streaming token cache: token form, single use, expiry and the in-flight limit."""

from __future__ import annotations

import re

import pytest

from servin_shim.errors import ResourceExhausted
from servin_shim.streaming.tokens import RequestCache, new_token


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_is_8_base64url_chars() -> None:
    for _ in range(200):
        assert re.fullmatch(r"[A-Za-z0-9_-]{8}", new_token())


def test_consume_returns_request() -> None:
    cache: RequestCache[str] = RequestCache()
    token = cache.insert("exec")

    assert cache.consume(token) == "exec"


def test_consume_is_single_use() -> None:
    cache: RequestCache[str] = RequestCache()
    token = cache.insert("exec")
    cache.consume(token)

    assert cache.consume(token) is None


def test_consume_unknown_token() -> None:
    assert RequestCache[str]().consume("AAAAAAAA") is None


def test_token_expires_after_ttl() -> None:
    clock = Clock()
    cache: RequestCache[str] = RequestCache(ttl=60, clock=clock)
    token = cache.insert("exec")
    clock.now += 60

    assert cache.consume(token) is None


def test_token_valid_before_ttl() -> None:
    clock = Clock()
    cache: RequestCache[str] = RequestCache(ttl=60, clock=clock)
    token = cache.insert("exec")
    clock.now += 59

    assert cache.consume(token) == "exec"


def test_in_flight_limit() -> None:
    cache: RequestCache[int] = RequestCache(max_in_flight=3)
    for i in range(3):
        cache.insert(i)

    with pytest.raises(ResourceExhausted, match="too many"):
        cache.insert(3)


def test_expired_tokens_free_slots() -> None:
    clock = Clock()
    cache: RequestCache[int] = RequestCache(ttl=60, max_in_flight=2, clock=clock)
    cache.insert(1)
    cache.insert(2)
    clock.now += 61

    cache.insert(3)

    assert len(cache) == 1
