"""Content-addressed blob store under ``<root>/content``.

Finished blobs live at ``blobs/sha256/<hex>``; downloads in progress live in ``ingest/``. A blob
reaches its final name only through ``BlobWriter.commit``, which checks size and digest, fsyncs
and renames, so a file under ``blobs/`` always matches its name.

A ``BlobFollower`` reads a blob while it downloads, so a layer can be unpacked during its
download. What it reads is not verified yet: its user must discard the result unless the
download commits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from servin_shim.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^sha256:([a-f0-9]{64})$")


def digest_hex(digest: str) -> str:
    """Return the hex part of ``sha256:<hex>``, or raise InvalidArgument for any other form."""
    match = _DIGEST_RE.match(digest)
    if not match:
        raise InvalidArgument(
            f"invalid digest {digest!r}: expected sha256: followed by 64 lowercase hex digits"
        )
    return match.group(1)


def sha256_digest(data: bytes) -> str:
    """Return the ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DiskUsage:
    """Bytes and inodes used by a directory tree."""

    used_bytes: int
    inodes_used: int


def tree_usage(*roots: Path) -> DiskUsage:
    """Sum the allocated bytes and count the inodes under ``roots`` without following symlinks."""
    used = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    stack = [root for root in roots if root.exists()]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            # Hardlinks share one inode, so count each inode once.
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            used += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return DiskUsage(used_bytes=used, inodes_used=inodes)


class BlobWriter:
    """Writer of one blob into ``ingest/``; ``commit`` verifies it and moves it into ``blobs/``.

    Use it as a context manager: leaving the block without ``commit`` deletes the partial file.
    """

    def __init__(self, store: ContentStore, digest: str, size: int) -> None:
        digest_hex(digest)
        if size < 0:
            raise InvalidArgument(f"invalid size {size} for blob {digest}: must not be negative")
        self.store = store
        self.digest = digest
        self.size = size
        self.written = 0
        self._hash = hashlib.sha256()
        # A random suffix lets two writers of the same blob proceed without sharing a file.
        name = f"{digest_hex(digest)}-{secrets.token_hex(4)}.partial"
        self.temp_path = store.ingest_dir / name
        store.ingest_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.temp_path, "xb")  # noqa: SIM115 - closed in commit/abort
        self._done = False
        self._followers = list(store.followers(digest))
        for follower in self._followers:
            follower.attach(self.temp_path)

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``, raising FailedPrecondition once the blob grows past its size."""
        if self.written + len(chunk) > self.size:
            raise FailedPrecondition(
                f"blob {self.digest} is larger than the expected {self.size} bytes; "
                "the registry sent different content than its manifest describes"
            )
        self._file.write(chunk)
        self._hash.update(chunk)
        self.written += len(chunk)
        if self._followers:
            # A follower reads the file with its own fd, so the bytes must leave our buffer.
            self._file.flush()
            for follower in self._followers:
                follower.advance(self.written)

    def reset(self) -> None:
        """Discard what was written, for a download that starts again from byte 0."""
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.written = 0
        for follower in self._followers:
            follower.attach(self.temp_path)

    def commit(self) -> Path:
        """Verify size and digest, then fsync and rename the blob to its final path."""
        if self.written != self.size:
            raise FailedPrecondition(
                f"blob {self.digest} has {self.written} bytes, expected {self.size}; "
                "the download ended early or the manifest is wrong"
            )
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise FailedPrecondition(
                f"blob digest mismatch: expected {self.digest}, got {actual}; "
                "the registry sent corrupt content"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.store.path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, final)
        for follower in self._followers:
            follower.committed(final)
        _fsync_dir(final.parent)
        self._done = True
        log.debug("blob committed digest=%s size=%d", self.digest, self.size)
        return final

    def abort(self) -> None:
        """Close and delete the partial file. Calling it again does nothing."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class BlobFollower:
    """Reader of one blob that may still be downloading, for a worker thread.

    ``read`` returns bytes as soon as a ``BlobWriter`` of the same digest has written them,
    and blocks until then. A writer that starts the blob over (a new writer after a failed
    endpoint, or a server that ignored a Range request) makes ``read`` raise BlobRestarted
    once, after which reading starts again at byte 0. The service calls ``finish`` after the
    download committed (or found the blob present) and ``fail`` when it gave up.
    """

    def __init__(self, store: ContentStore, digest: str, size: int) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self._cond = threading.Condition()
        self._path: Path | None = None
        self._generation = 0
        self._written = 0
        self._complete = False
        self._error: str | None = None
        # Reader state, used only by the one reading thread.
        self._fd: int | None = None
        self._read_generation = -1
        self._offset = 0

    # --- writer side (event loop thread) ---

    def attach(self, path: Path) -> None:
        """Start following a new partial file from byte 0."""
        with self._cond:
            self._generation += 1
            self._path = path
            self._written = 0
            self._cond.notify_all()

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify_all()

    def committed(self, final: Path) -> None:
        """Record that the followed file was verified and renamed to ``final``."""
        with self._cond:
            self._path = final
            self._written = self.size
            self._complete = True
            self._cond.notify_all()

    def finish(self) -> None:
        """Mark the blob complete in the store, for a download that no followed writer did."""
        with self._cond:
            if self._complete:
                return
            self._generation += 1
            self._path = self.store.path(self.digest)
            self._written = self.size
            self._complete = True
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """Make ``read`` raise FailedPrecondition with ``reason`` from now on."""
        with self._cond:
            self._error = reason
            self._cond.notify_all()

    # --- reader side (worker thread) ---

    def read(self, size: int) -> bytes:
        """Return up to ``size`` bytes at the read position, b"" at the end of the blob."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise FailedPrecondition(self._error)
                if self._path is not None and self._read_generation != self._generation:
                    restarted = self._offset > 0
                    self._close_fd()
                    self._read_generation = self._generation
                    if restarted:
                        raise BlobRestarted(f"download of blob {self.digest} started over")
                if self._path is not None and self._fd is None:
                    try:
                        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        # The writer is renaming the file; committed() names the new path.
                        self._cond.wait(0.05)
                        continue
                if self._fd is not None and self._offset < self._written:
                    count = min(size, self._written - self._offset)
                    fd, offset = self._fd, self._offset
                    break
                if self._fd is not None and self._complete:
                    return b""
                self._cond.wait(1.0)
        data = os.pread(fd, count, offset)
        self._offset += len(data)
        return data

    def close(self) -> None:
        """Close the reader's file; call it from the reading thread when done."""
        with self._cond:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._offset = 0


class BlobRestarted(Exception):
    """The followed download started over from byte 0, so the reader must start over too."""


class ContentStore:
    """Content-addressed store of blobs (manifests, configs, compressed layers)."""

    def __init__(self, root: Path) -> None:
        self._followers: dict[str, list[BlobFollower]] = {}
        self.root = root / "content"
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.ingest_dir = self.root / "ingest"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)

    def clean_ingest(self) -> None:
        """Delete partial downloads left by a crash. Call it at start, before any pull."""
        for leftover in self.ingest_dir.iterdir():
            log.info("removing partial download path=%s", leftover)
            leftover.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        """Return the final path of ``digest`` (which may not exist yet)."""
        return self.blobs_dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in the content store") from None

    def follow(self, digest: str, size: int) -> BlobFollower:
        """Register a follower that sees every writer of ``digest`` until ``unfollow``."""
        follower = BlobFollower(self, digest, size)
        self._followers.setdefault(digest, []).append(follower)
        return follower

    def unfollow(self, follower: BlobFollower) -> None:
        followers = self._followers.get(follower.digest, [])
        if follower in followers:
            followers.remove(follower)
        if not followers:
            self._followers.pop(follower.digest, None)

    def followers(self, digest: str) -> list[BlobFollower]:
        return self._followers.get(digest, [])

    def writer(self, digest: str, size: int) -> BlobWriter:
        """Open a writer for a blob with a known digest and size."""
        return BlobWriter(self, digest, size)

    async def ingest(self, digest: str, size: int, chunks: AsyncIterator[bytes]) -> Path:
        """Write ``chunks`` as blob ``digest``, checking size while they arrive and digest at the end."""
        with self.writer(digest, size) as writer:
            async for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def write_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (verified against ``digest`` when given) and return its digest."""
        digest = digest or sha256_digest(data)
        if self.has(digest):
            return digest
        with self.writer(digest, len(data)) as writer:
            writer.write(data)
            writer.commit()
        return digest

    def read_bytes(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found in the content store") from None

    def read_json(self, digest: str) -> Any:
        data = self.read_bytes(digest)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"blob {digest} is not valid JSON: {exc}") from exc

    def delete(self, digest: str) -> bool:
        """Delete a blob and return False when it was not present."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        log.debug("blob deleted digest=%s", digest)
        return True

    def digests(self) -> Iterator[str]:
        """Yield the digest of every finished blob."""
        for entry in self.blobs_dir.iterdir():
            yield f"sha256:{entry.name}"

    def usage(self) -> DiskUsage:
        return tree_usage(self.root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
