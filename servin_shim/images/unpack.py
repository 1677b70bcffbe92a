"""Layer unpacking into overlayfs-ready snapshot directories under ``<root>/snapshots``.

Each layer is unpacked once into ``snapshots/<chain id hex>/fs`` and shared by every image that
has the same chain. The directories are overlayfs lower layers, so OCI whiteouts become overlay
whiteouts: ``.wh.NAME`` turns into a character device 0/0 called NAME, and ``.wh..wh..opq``
turns into the xattr ``trusted.overlay.opaque=y`` on its directory. A layer is unpacked into a
temporary directory and renamed into place only after its diff ID checks out, so a crash never
leaves a partial snapshot under a final name.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import logging
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from servin_shim.errors import FailedPrecondition, InvalidArgument
from servin_shim.images.content import DiskUsage, digest_hex, sha256_digest, tree_usage

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX_PREFIX = "SCHILY.xattr."
# Layers must not set overlayfs' own xattrs: a forged redirect or metacopy could expose
# host files through the mount.
_FORBIDDEN_XATTR_PREFIX = "trusted.overlay."
_COPY_CHUNK = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


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
        blob: Path,
        diff_id: str,
        lowers: list[Path],
        on_entry: Callable[[], None] | None = None,
    ) -> Path:
        """Unpack ``blob`` as the snapshot ``chain_id`` unless present, and return its fs path.

        ``lowers`` are the fs directories of the layers below, top first. Hardlinks to files of
        lower layers are copied from there. The caller serializes calls per chain ID.
        ``on_entry`` is called from the worker thread after each tar entry.
        """
        final = self.path(chain_id)
        if self.has(chain_id):
            return final / "fs"
        temp = self.dir / f"tmp-{final.name}-{secrets.token_hex(4)}"
        (temp / "fs").mkdir(parents=True)
        try:
            actual = await asyncio.to_thread(apply_layer, blob, temp / "fs", lowers, on_entry)
            if actual != diff_id:
                raise FailedPrecondition(
                    f"layer diff ID mismatch for blob {blob.name}: the image config says "
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


class _HashingReader:
    """File-like wrapper that hashes every byte read through it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.hash.update(data)
        return data

    def drain(self) -> None:
        """Read and hash the rest, such as the zero blocks after the end-of-archive marker."""
        while self.read(_COPY_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _open_decompressed(raw: IO[bytes]) -> IO[bytes]:
    # The magic bytes decide, so a layer with a mislabelled media type still unpacks.
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if magic == _ZSTD_MAGIC:
        reader: Any = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return reader  # type: ignore[no-any-return]
    return raw


def apply_layer(
    blob: Path,
    dest: Path,
    lowers: list[Path],
    on_entry: Callable[[], None] | None = None,
) -> str:
    """Unpack the layer tar in ``blob`` into the empty directory ``dest`` and return its diff ID."""
    with open(blob, "rb") as raw, _open_decompressed(raw) as stream:
        reader = _HashingReader(stream)
        try:
            with tarfile.open(
                fileobj=cast(IO[bytes], reader), mode="r|", errors="surrogateescape"
            ) as archive:
                applier = _LayerApplier(dest, lowers)
                for member in archive:
                    applier.apply(archive, member)
                    if on_entry is not None:
                        on_entry()
                applier.finish()
            reader.drain()
        except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise InvalidArgument(
                f"layer blob {blob.name} is not a valid tar archive: {exc}"
            ) from exc
    return reader.digest()


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


class _LayerApplier:
    """Applies tar entries to a snapshot directory, one at a time, in archive order."""

    def __init__(self, dest: Path, lowers: list[Path]) -> None:
        self.dest = dest
        self.lowers = lowers
        self.dir_mtimes: dict[str, int] = {}

    def apply(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = _clean_name(member.name)
        if rel == "":
            if not member.isdir():
                raise InvalidArgument(f"layer entry {member.name!r} at the root is not a directory")
            self._set_metadata(self.dest, member)
            self.dir_mtimes[""] = int(member.mtime)
            return
        parent_rel, _, base = rel.rpartition("/")
        parent = self._ensure_parent(parent_rel, member.name)

        if base == OPAQUE_MARKER:
            os.setxattr(parent, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_PREFIX):
            hidden = base[len(WHITEOUT_PREFIX) :]
            if hidden in ("", ".", ".."):
                raise InvalidArgument(f"layer entry {member.name!r} is an invalid whiteout")
            target = parent / hidden
            _remove(target)
            # overlayfs reads a 0/0 character device as "deleted in this layer".
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            return

        target = parent / base
        existing = _lstat(target)
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and member.isdir()):
            _remove(target)

        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                target.mkdir(mode=0o700)
            self.dir_mtimes[rel] = int(member.mtime)
        elif member.isreg():
            self._write_file(archive, member, target)
        elif member.issym():
            self._check_symlink(rel, member)
            os.symlink(member.linkname, target)
        elif member.islnk():
            self._link(member, target)
            return  # a hardlink shares its inode and metadata with the file it points to
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise InvalidArgument(
                f"layer entry {member.name!r} has unsupported tar type {member.type!r}"
            )
        self._set_metadata(target, member)
        if not member.isdir():
            mtime_ns = int(member.mtime * 1_000_000_000)
            os.utime(target, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        """Set directory mtimes last, deepest first, because writing entries changes them."""
        for rel in sorted(
            self.dir_mtimes, key=lambda r: r.count("/") + (1 if r else 0), reverse=True
        ):
            mtime_ns = self.dir_mtimes[rel] * 1_000_000_000
            os.utime(
                self.dest / rel if rel else self.dest,
                ns=(mtime_ns, mtime_ns),
                follow_symlinks=False,
            )

    def _ensure_parent(self, parent_rel: str, entry: str) -> Path:
        """Return the parent directory, creating missing ones and rejecting symlinked parents."""
        current = self.dest
        if not parent_rel:
            return current
        for part in parent_rel.split("/"):
            current = current / part
            st = _lstat(current)
            if st is None:
                current.mkdir(mode=0o755)
            elif stat.S_ISLNK(st.st_mode):
                raise InvalidArgument(
                    f"layer entry {entry!r} would write through the symlink "
                    f"{current.relative_to(self.dest)}"
                )
            elif not stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(
                    f"layer entry {entry!r} has a parent {current.relative_to(self.dest)} "
                    "that is not a directory"
                )
        return current

    def _write_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
        source = archive.extractfile(member)
        if source is None:
            raise InvalidArgument(f"layer entry {member.name!r} has no readable content")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o600)
        with source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, _COPY_CHUNK)

    def _check_symlink(self, rel: str, member: tarfile.TarInfo) -> None:
        # An absolute target resolves inside the container root at run time, so it is safe.
        # A relative one must not climb above the layer root.
        target = member.linkname
        if not target:
            raise InvalidArgument(f"layer entry {member.name!r} is a symlink with an empty target")
        if target.startswith("/"):
            return
        depth = rel.count("/")
        for part in target.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    raise InvalidArgument(
                        f"layer entry {member.name!r} is a symlink to {target!r}, "
                        "which points outside the image root"
                    )
            elif part not in ("", "."):
                depth += 1

    def _link(self, member: tarfile.TarInfo, target: Path) -> None:
        link_rel = _clean_name(member.linkname, member.name)
        if not link_rel:
            raise InvalidArgument(f"layer entry {member.name!r} is a hardlink to the layer root")
        source = self._existing_path(self.dest, link_rel, member.name)
        if source is not None:
            if source.is_dir() and not source.is_symlink():
                raise InvalidArgument(f"layer entry {member.name!r} is a hardlink to a directory")
            os.link(source, target, follow_symlinks=False)
            return
        # The file lives in a lower layer. overlayfs cannot link across layers, so copy it.
        for lower in self.lowers:
            source = self._existing_path(lower, link_rel, member.name)
            if source is None:
                continue
            st = source.lstat()
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                break  # whited out in that layer
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(
                    f"layer entry {member.name!r} is a hardlink to {member.linkname!r} in a lower "
                    "layer, which is not a regular file"
                )
            shutil.copy2(source, target, follow_symlinks=False)
            os.lchown(target, st.st_uid, st.st_gid)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            return
        raise InvalidArgument(
            f"layer entry {member.name!r} is a hardlink to {member.linkname!r}, which is not in "
            "this layer or a lower one"
        )

    def _existing_path(self, root: Path, rel: str, entry: str) -> Path | None:
        """Return root/rel if it exists and no parent on the way is a symlink."""
        current = root
        parts = rel.split("/")
        for index, part in enumerate(parts):
            current = current / part
            st = _lstat(current)
            if st is None:
                return None
            if index < len(parts) - 1 and stat.S_ISLNK(st.st_mode):
                raise InvalidArgument(
                    f"layer entry {entry!r} is a hardlink through the symlink {'/'.join(parts[: index + 1])}"
                )
        return current

    def _set_metadata(self, target: Path, member: tarfile.TarInfo) -> None:
        # chown clears setuid/setgid bits and file capabilities, so it goes first.
        os.lchown(target, member.uid, member.gid)
        if not member.issym():
            os.chmod(target, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PAX_PREFIX):
                continue
            name = key[len(_XATTR_PAX_PREFIX) :]
            if name.startswith(_FORBIDDEN_XATTR_PREFIX):
                log.warning(
                    "ignoring overlayfs xattr in layer entry=%s xattr=%s", member.name, name
                )
                continue
            raw = value.encode("utf-8", "surrogateescape")
            os.setxattr(target, name, raw, follow_symlinks=False)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
