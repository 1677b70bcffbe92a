"""Fixtures for image tests: ImageService instances on temporary roots, closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from servin_shim.images.service import ImageService
from servin_shim.state.db import Database


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., ImageService]]:
    """Build an ImageService under tmp_path; keyword arguments go to its constructor."""
    databases: list[Database] = []

    def build(name: str = "images", **kwargs: Any) -> ImageService:
        db = Database(tmp_path / f"{name}.db")
        databases.append(db)
        return ImageService(tmp_path / name, db, **kwargs)

    yield build
    for db in databases:
        db.close()
