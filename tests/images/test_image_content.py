"""Tests of the content-addressed blob store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servin_shim.errors import FailedPrecondition, InvalidArgument, NotFound
from servin_shim.images.content import ContentStore, sha256_digest


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def leftovers(store: ContentStore) -> list[Path]:
    return [*store.blobs_dir.iterdir(), *store.ingest_dir.iterdir()]


async def test_ingest_stores_blob(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    digest = sha256_digest(b"hello world")
    path = await store.ingest(digest, 11, chunks(b"hello ", b"world"))
    assert path == tmp_path / "content/blobs/sha256" / digest.removeprefix("sha256:")
    assert store.read_bytes(digest) == b"hello world"
    assert list(store.ingest_dir.iterdir()) == []


async def test_digest_mismatch_leaves_nothing(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    digest = sha256_digest(b"hello world")
    with pytest.raises(FailedPrecondition) as error:
        await store.ingest(digest, 11, chunks(b"hello WORLD"))
    assert digest in str(error.value)
    assert leftovers(store) == []


async def test_oversize_stops_early(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    digest = sha256_digest(b"abc")
    with pytest.raises(FailedPrecondition):
        await store.ingest(digest, 3, chunks(b"ab", b"cd", b"never read"))
    assert leftovers(store) == []


async def test_short_blob_rejected(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    with pytest.raises(FailedPrecondition):
        await store.ingest(sha256_digest(b"abc"), 3, chunks(b"ab"))
    assert leftovers(store) == []


def test_json_and_delete(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    digest = store.write_bytes(b'{"a": 1}')
    assert store.read_json(digest) == {"a": 1}
    assert store.delete(digest)
    assert not store.has(digest)
    with pytest.raises(NotFound):
        store.read_bytes(digest)


def test_bad_digest_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        ContentStore(tmp_path).path("sha256:../../etc/passwd")


def test_usage_counts_blobs(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    before = store.usage()
    store.write_bytes(b"x" * 10000)
    after = store.usage()
    assert after.used_bytes >= before.used_bytes + 10000
    assert after.inodes_used == before.inodes_used + 1


def test_partial_downloads_cleaned(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    (store.ingest_dir / "abc.partial").write_bytes(b"half")
    store.clean_ingest()
    assert list(store.ingest_dir.iterdir()) == []
