"""Fixtures for end-to-end tests: a real servin-shim daemon driven over its CRI socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.daemon import Daemon


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    server = Daemon()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
