"""Layer unpacking into overlayfs-ready snapshot directories under ``<root>/snapshots``.

Each layer is unpacked once into ``snapshots/<chain id hex>/fs`` and shared by every image that
has the same chain. The directories are overlayfs lower layers, so OCI whiteouts become overlay
whiteouts: ``.wh.NAME`` turns into a character device 0/0 called NAME, and ``.wh..wh..opq``
turns into the xattr ``trusted.overlay.opaque=y`` on its directory. A layer is unpacked into a
temporary directory and renamed into place only after its diff ID checks out, so a crash never
leaves a partial snapshot under a final name.

A layer can be unpacked while it downloads, when ``blob`` is a ``BlobFollower``. The layers of
one image can be unpacked at the same time, each in its own thread. A layer needs the layers
below it only for a hardlink to one of their files, and waits for them then.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from servin_shim.errors import FailedPrecondition, InvalidArgument
from servin_shim.images import tarstream
from servin_shim.images.content import (
    BlobFollower,
    BlobRestarted,
    DiskUsage,
    digest_hex,
    sha256_digest,
    tree_usage,
)
from servin_shim.images.tarstream import TarEntry, TarStream

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Layers must not set overlayfs' own xattrs: a forged redirect or metacopy could expose
# host files through the mount.
_FORBIDDEN_XATTR_PREFIX = "trusted.overlay."
_T = TypeVar("_T")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Return the chain ID of each layer, bottom first: sha256 of "<parent chain> <diff id>"."""
    result: list[str] = []
    for diff_id in diff_ids:
        digest_hex(diff_id)
        if not result:
            result.append(diff_id)
        else:
            result.append(sha256_digest(f"{result[-1]} {diff_id}".encode()))
    return result


class SnapshotStore:
    """Unpacked layers keyed by chain ID."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, chain_id: str) -> Path:
        return self.dir / digest_hex(chain_id)

    def fs(self, chain_id: str) -> Path:
        """Return the directory to use as an overlayfs lowerdir for this layer."""
        return self.path(chain_id) / "fs"

    def has(self, chain_id: str) -> bool:
        return self.fs(chain_id).is_dir()

    def chain_ids(self) -> Iterator[str]:
        for entry in self.dir.iterdir():
            if not entry.name.startswith("tmp-"):
                yield f"sha256:{entry.name}"

    def clean_temp(self) -> None:
        """Delete unpacks that a crash interrupted. Call it at start, before any pull."""
        for entry in self.dir.iterdir():
            if entry.name.startswith("tmp-"):
                log.info("removing interrupted unpack path=%s", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def delete(self, chain_id: str) -> None:
        target = self.path(chain_id)
        if not target.exists():
            return
        # Rename first so a crash during the slow delete leaves only a tmp- directory.
        doomed = self.dir / f"tmp-delete-{target.name}-{secrets.token_hex(4)}"
        os.rename(target, doomed)
        shutil.rmtree(doomed)
        log.info("snapshot deleted chain_id=%s", chain_id)

    def usage(self) -> DiskUsage:
        return tree_usage(self.dir)

    async def unpack(
        self,
        chain_id: str,
        blob: Path | BlobFollower,
        diff_id: str,
        lowers: list[Path] | Callable[[], list[Path]],
        on_entry: Callable[[], None] | None = None,
    ) -> Path:
        """Unpack ``blob`` as the snapshot ``chain_id`` unless present, and return its fs path.

        ``blob`` and ``lowers`` are as in ``apply_layer``. Hardlinks to files of lower layers
        are copied from there. The caller serializes calls per chain ID, and for a follower
        checks the blob digest: the snapshot must be deleted if the download fails after this
        returns. ``on_entry`` is called from the worker thread after each tar entry.
        """
        final = self.path(chain_id)
        if self.has(chain_id):
            return final / "fs"
        temp = self.dir / f"tmp-{final.name}-{secrets.token_hex(4)}"
        (temp / "fs").mkdir(parents=True)
        blob_name = blob.digest if isinstance(blob, BlobFollower) else blob.name
        stop = threading.Event()
        try:
            actual = await _in_thread(
                lambda: apply_layer(blob, temp / "fs", lowers, on_entry, stop), stop
            )
            if actual != diff_id:
                raise FailedPrecondition(
                    f"layer diff ID mismatch for blob {blob_name}: the image config lists "
                    f"{diff_id}, the uncompressed layer is {actual}"
                )
            # NOTE: the tree is not fsynced before the rename, so after a power loss (not a
            # daemon crash) a snapshot may exist with data that never reached the disk.
            try:
                os.rename(temp, final)
            except OSError as exc:
                # Another process (an import next to the daemon) finished the same chain.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.has(chain_id):
                    raise
                shutil.rmtree(temp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        log.info("layer unpacked chain_id=%s diff_id=%s", chain_id, diff_id)
        return final / "fs"


async def _in_thread(work: Callable[[], _T], stop: threading.Event) -> _T:
    """Run ``work`` in a new thread and return its result.

    A thread of its own, not the default executor: unpacks block while they wait for a
    download or a lower layer, and a full executor would deadlock them. On cancellation,
    ``stop`` is set and the thread is awaited, so no thread writes into a deleted directory.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
            return
        loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="servin-unpack", daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        stop.set()
        try:
            await done
        except BaseException as exc:  # noqa: BLE001 - the thread's end matters, not its error
            log.debug("stopped unpack thread ended error=%r", exc)
        raise


class UnpackStopped(FailedPrecondition):
    """The unpack was asked to stop (its pull was cancelled or another layer failed)."""


def apply_layer(
    blob: Path | BlobFollower,
    dest: Path,
    lowers: list[Path] | Callable[[], list[Path]],
    on_entry: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> str:
    """Unpack the layer tar in ``blob`` into the empty directory ``dest`` and return its diff ID.

    ``blob`` is a finished blob file or a follower of a running download. ``lowers`` are the fs
    directories of the layers below, top first. It may be a callable that waits until they are
    unpacked and returns them, which is called only for a hardlink into a lower layer. A set
    ``stop`` makes the unpack raise UnpackStopped at the next entry.
    """
    while True:
        try:
            if isinstance(blob, BlobFollower):
                return _apply_stream(blob.read, blob.digest, dest, lowers, on_entry, stop)
            with open(blob, "rb", buffering=0) as raw:
                return _apply_stream(raw.read, blob.name, dest, lowers, on_entry, stop)
        except BlobRestarted:
            log.info("layer download started over, unpacking again dest=%s", dest)
            for child in os.listdir(dest):
                remove_path(dest / child)


def _apply_stream(
    read: Callable[[int], bytes],
    blob_name: str,
    dest: Path,
    lowers: list[Path] | Callable[[], list[Path]],
    on_entry: Callable[[], None] | None,
    stop: threading.Event | None,
) -> str:
    stream = TarStream(read)
    applier = _LayerApplier(dest, lowers, stream)
    try:
        for entry in stream.entries():
            if stop is not None and stop.is_set():
                raise UnpackStopped(f"unpack of {blob_name} stopped")
            applier.apply(entry)
            if on_entry is not None:
                on_entry()
        applier.finish()
        stream.drain()
    except InvalidArgument as exc:
        if str(exc).startswith("layer entry"):
            raise
        raise InvalidArgument(f"layer blob {blob_name} is not a valid tar archive: {exc}") from exc
    return stream.diff_id()


def _clean_name(name: str, entry: str | None = None) -> str:
    """Return ``name`` relative to the layer root, rejecting absolute paths and '..'.

    ``entry`` is the tar entry to name in errors when ``name`` is a hardlink target.
    """
    subject = (
        f"layer entry {entry!r} links to {name!r}, which" if entry else f"layer entry {name!r}"
    )
    if name.startswith("/"):
        raise InvalidArgument(f"{subject} has an absolute path; layers use relative paths")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"{subject} contains '..' and would reach outside the layer")
    return "/".join(parts)


# Kinds of the paths a layer created, tracked in memory so that the safety checks of each
# entry need no lstat of its parents.
_DIR = 1
_SYMLINK = 2
_OTHER = 3


class _LayerApplier:
    """Applies tar entries to a snapshot directory, one at a time, in archive order.

    ``dest`` starts empty and only this applier writes to it, so ``kinds`` (relative path ->
    kind) describes every path under it.
    """

    def __init__(
        self, dest: Path, lowers: list[Path] | Callable[[], list[Path]], stream: TarStream
    ) -> None:
        self.dest = dest
        self.root = str(dest)
        self._lowers = lowers
        self.stream = stream
        self.kinds: dict[str, int] = {"": _DIR}
        self.dir_mtimes: dict[str, int] = {}

    def lowers(self) -> list[Path]:
        if callable(self._lowers):
            self._lowers = self._lowers()
        return self._lowers

    def apply(self, entry: TarEntry) -> None:
        rel = _clean_name(entry.name)
        if rel == "":
            if not entry.is_dir():
                raise InvalidArgument(f"layer entry {entry.name!r} at the root is not a directory")
            self._set_metadata(self.root, entry)
            self.dir_mtimes[""] = int(entry.mtime)
            return
        parent_rel, _, base = rel.rpartition("/")
        self._ensure_parent(parent_rel, entry.name)
        parent = f"{self.root}/{parent_rel}" if parent_rel else self.root

        if base == OPAQUE_MARKER:
            os.setxattr(parent, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_PREFIX):
            hidden = base[len(WHITEOUT_PREFIX) :]
            if hidden in ("", ".", ".."):
                raise InvalidArgument(f"layer entry {entry.name!r} is an invalid whiteout")
            hidden_rel = f"{parent_rel}/{hidden}" if parent_rel else hidden
            self._remove(hidden_rel)
            # overlayfs reads a 0/0 character device as "deleted in this layer".
            os.mknod(f"{parent}/{hidden}", stat.S_IFCHR | 0o000, os.makedev(0, 0))
            self.kinds[hidden_rel] = _OTHER
            return

        target = f"{parent}/{base}"
        existing = self.kinds.get(rel)
        is_dir = entry.is_dir()
        if existing is not None and not (existing == _DIR and is_dir):
            self._remove(rel)
            existing = None

        kind = entry.type
        if is_dir:
            if existing is None:
                os.mkdir(target, 0o700)
                self.kinds[rel] = _DIR
            self._set_metadata(target, entry)
            self.dir_mtimes[rel] = int(entry.mtime)
            return
        if entry.is_regular():
            self._write_file(entry, target)
            self.kinds[rel] = _OTHER
            return
        if kind == tarstream.SYMLINK:
            self._check_symlink(rel, entry)
            os.symlink(entry.linkname, target)
            self.kinds[rel] = _SYMLINK
        elif kind == tarstream.HARDLINK:
            self._link(rel, entry, target)
            return  # a hardlink shares its inode and metadata with the file it points to
        elif kind in (tarstream.CHARDEV, tarstream.BLOCKDEV):
            device = stat.S_IFCHR if kind == tarstream.CHARDEV else stat.S_IFBLK
            os.mknod(target, device | 0o600, os.makedev(entry.devmajor, entry.devminor))
            self.kinds[rel] = _OTHER
        elif kind == tarstream.FIFO:
            os.mkfifo(target, 0o600)
            self.kinds[rel] = _OTHER
        else:
            raise InvalidArgument(
                f"layer entry {entry.name!r} has unsupported tar type {kind.decode('latin-1')!r}"
            )
        self._set_metadata(target, entry)
        mtime_ns = int(entry.mtime * 1_000_000_000)
        os.utime(target, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        """Set directory mtimes last, deepest first, because writing entries changes them."""
        for rel in sorted(
            self.dir_mtimes, key=lambda r: r.count("/") + (1 if r else 0), reverse=True
        ):
            mtime_ns = self.dir_mtimes[rel] * 1_000_000_000
            os.utime(
                f"{self.root}/{rel}" if rel else self.root,
                ns=(mtime_ns, mtime_ns),
                follow_symlinks=False,
            )

    def _ensure_parent(self, parent_rel: str, entry: str) -> None:
        """Create missing parent directories and reject parents that are symlinks or files."""
        if not parent_rel or self.kinds.get(parent_rel) == _DIR:
            return
        current = ""
        for part in parent_rel.split("/"):
            current = f"{current}/{part}" if current else part
            kind = self.kinds.get(current)
            if kind is None:
                os.mkdir(f"{self.root}/{current}", 0o755)
                self.kinds[current] = _DIR
            elif kind == _SYMLINK:
                raise InvalidArgument(
                    f"layer entry {entry!r} would write through the symlink {current}"
                )
            elif kind != _DIR:
                raise InvalidArgument(
                    f"layer entry {entry!r} has a parent {current} that is not a directory"
                )

    def _remove(self, rel: str) -> None:
        kind = self.kinds.pop(rel, None)
        if kind is None:
            return
        path = f"{self.root}/{rel}"
        if kind != _DIR:
            os.unlink(path)
            return
        shutil.rmtree(path)
        prefix = rel + "/"
        for key in [key for key in self.kinds if key.startswith(prefix)]:
            del self.kinds[key]
        for key in [key for key in self.dir_mtimes if key == rel or key.startswith(prefix)]:
            del self.dir_mtimes[key]

    def _write_file(self, entry: TarEntry, target: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o600)
        try:
            self.stream.copy_data(entry, fd)
            # chown clears setuid/setgid bits and file capabilities, so it goes first.
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode & 0o7777)
            self._set_xattrs(fd, entry)
            mtime_ns = int(entry.mtime * 1_000_000_000)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def _check_symlink(self, rel: str, entry: TarEntry) -> None:
        # An absolute target resolves inside the container root at run time, so it is safe.
        # A relative one must not climb above the layer root.
        target = entry.linkname
        if not target:
            raise InvalidArgument(f"layer entry {entry.name!r} is a symlink with an empty target")
        if target.startswith("/"):
            return
        depth = rel.count("/")
        for part in target.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    raise InvalidArgument(
                        f"layer entry {entry.name!r} is a symlink to {target!r}, "
                        "which points outside the image root"
                    )
            elif part not in ("", "."):
                depth += 1

    def _link(self, rel: str, entry: TarEntry, target: str) -> None:
        link_rel = _clean_name(entry.linkname, entry.name)
        if not link_rel:
            raise InvalidArgument(f"layer entry {entry.name!r} is a hardlink to the layer root")
        kind = self._existing_kind(link_rel, entry.name)
        if kind is not None:
            if kind == _DIR:
                raise InvalidArgument(f"layer entry {entry.name!r} is a hardlink to a directory")
            os.link(f"{self.root}/{link_rel}", target, follow_symlinks=False)
            self.kinds[rel] = kind
            return
        # The file lives in a lower layer. overlayfs cannot link across layers, so copy it.
        for lower in self.lowers():
            source = self._existing_lower_path(lower, link_rel, entry.name)
            if source is None:
                continue
            st = source.lstat()
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                break  # whited out in that layer
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(
                    f"layer entry {entry.name!r} is a hardlink to {entry.linkname!r} in a lower "
                    "layer, which is not a regular file"
                )
            shutil.copy2(source, target, follow_symlinks=False)
            os.lchown(target, st.st_uid, st.st_gid)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            self.kinds[rel] = _OTHER
            return
        raise InvalidArgument(
            f"layer entry {entry.name!r} is a hardlink to {entry.linkname!r}, which is not in "
            "this layer or a lower one"
        )

    def _existing_kind(self, rel: str, entry: str) -> int | None:
        """Return the kind of ``rel`` in this layer, rejecting a path through a symlink."""
        parts = rel.split("/")
        current = ""
        for part in parts[:-1]:
            current = f"{current}/{part}" if current else part
            kind = self.kinds.get(current)
            if kind is None:
                return None
            if kind == _SYMLINK:
                raise InvalidArgument(
                    f"layer entry {entry!r} is a hardlink through the symlink {current}"
                )
        return self.kinds.get(rel)

    def _existing_lower_path(self, root: Path, rel: str, entry: str) -> Path | None:
        """Return root/rel if it exists and no parent on the way is a symlink."""
        current = root
        parts = rel.split("/")
        for index, part in enumerate(parts):
            current = current / part
            st = lstat_or_none(current)
            if st is None:
                return None
            if index < len(parts) - 1 and stat.S_ISLNK(st.st_mode):
                through = "/".join(parts[: index + 1])
                raise InvalidArgument(
                    f"layer entry {entry!r} is a hardlink through the symlink {through}"
                )
        return current

    def _set_metadata(self, target: str, entry: TarEntry) -> None:
        # chown clears setuid/setgid bits and file capabilities, so it goes first.
        os.lchown(target, entry.uid, entry.gid)
        if entry.type != tarstream.SYMLINK:
            os.chmod(target, entry.mode & 0o7777)
        self._set_xattrs(target, entry)

    def _set_xattrs(self, target: str | int, entry: TarEntry) -> None:
        for name, value in entry.xattrs.items():
            if name.startswith(_FORBIDDEN_XATTR_PREFIX):
                log.warning("ignoring overlayfs xattr in layer entry=%s xattr=%s", entry.name, name)
                continue
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree; a missing path is fine."""
    st = lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
