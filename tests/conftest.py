"""Fixtures shared by every test suite: a real registry and a busybox image pushed to it.

Sub-folders add their own fixtures in their own conftest.py files.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tests folder is not a package, so make "tests.support" importable from any working dir.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support.imagebuild import Image, busybox_image, push_image
from tests.support.registry import Registry

log = logging.getLogger(__name__)

BUSYBOX_REPOSITORY = "test/busybox"
BUSYBOX_TAG = "1"


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1 without authentication, shared by the session."""
    server = Registry().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def busybox() -> Image:
    """The busybox test image (``Cmd ["sh"]``), built once per session."""
    return busybox_image()


@pytest.fixture(scope="session")
def busybox_ref(registry: Registry, busybox: Image) -> str:
    """Reference of the busybox image pushed to ``registry``: ``127.0.0.1:PORT/test/busybox:1``."""
    return push_image(registry.host, BUSYBOX_REPOSITORY, BUSYBOX_TAG, busybox)
