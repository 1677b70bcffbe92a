"""Root filesystems from snapshot layers without overlayfs: the detection and the copy fallback.

Containers normally stack the snapshot directories with overlayfs
(``servin_shim.oci.rootfs.mount_overlay``). ``overlay_supported`` checks once per directory
whether an overlay mount with whiteouts works there, for example not on a filesystem that
overlayfs refuses as upper layer. Where it does not, ``build_rootfs_copy`` merges the layers
into a plain directory, applying the overlay whiteouts (0/0 character devices) and opaque
directories (``trusted.overlay.opaque=y``) that the unpacker wrote.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from servin_shim.errors import ServinError
from servin_shim.images.unpack import OPAQUE_XATTR, lstat_or_none, remove_path
from servin_shim.oci.rootfs import mount_overlay, unmount

log = logging.getLogger(__name__)

_OVERLAY_XATTR_PREFIX = "trusted.overlay."
_overlay_results: dict[Path, bool] = {}


def overlay_supported(work_dir: Path) -> bool:
    """Return True if overlayfs with whiteouts can be mounted from ``work_dir``; cached.

    ``work_dir`` should be on the filesystem that contains the snapshots and container upper
    directories. The first False result is logged at warning level.
    """
    key = work_dir.resolve()
    if key in _overlay_results:
        return _overlay_results[key]
    work_dir.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix="overlay-check-", dir=work_dir))
    supported = False
    try:
        lower, top = probe / "lower", probe / "top"
        (lower / "dir").mkdir(parents=True)
        (lower / "hidden").write_bytes(b"x")
        (top / "dir").mkdir(parents=True)
        os.mknod(top / "hidden", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        merged = probe / "merged"
        try:
            mount_overlay([lower, top], probe / "upper", probe / "work", merged)
        except (OSError, ServinError) as exc:
            log.warning(
                "overlayfs unavailable, containers get copied root filesystems path=%s error=%s",
                work_dir,
                exc,
            )
        else:
            try:
                supported = (merged / "dir").is_dir() and not (merged / "hidden").exists()
            finally:
                unmount(merged)
            if not supported:
                log.warning(
                    "overlayfs ignores whiteouts, containers get copied root filesystems path=%s",
                    work_dir,
                )
    except OSError as exc:
        log.warning("overlayfs check failed path=%s error=%s", work_dir, exc)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    _overlay_results[key] = supported
    return supported


def build_rootfs_copy(layers: list[Path], target: Path) -> None:
    """Merge snapshot ``layers`` (bottom first) into the empty or missing directory ``target``.

    The result matches what an overlay mount of the layers shows: whiteouts delete, opaque
    directories hide lower content, and owners, modes, xattrs, mtimes and in-layer hardlinks
    are kept.
    """
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise ServinError(f"cannot build a root filesystem in {target}: the directory is not empty")
    log.info("building copied root filesystem target=%s layers=%d", target, len(layers))
    dir_sources: dict[Path, Path] = {target: layers[-1] if layers else target}
    for layer in layers:
        _merge_layer(layer, target, dir_sources)
    # Directory mtimes last, deepest first, because creating entries changes them.
    for directory in sorted(dir_sources, key=lambda p: len(p.parts), reverse=True):
        if not directory.is_dir():
            continue  # removed by a whiteout in a higher layer
        source = dir_sources[directory]
        st = os.lstat(source)
        os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _merge_layer(layer: Path, target: Path, dir_sources: dict[Path, Path]) -> None:
    links: dict[tuple[int, int], Path] = {}
    for current, dirnames, filenames in os.walk(layer):
        source_dir = Path(current)
        dest_dir = target / source_dir.relative_to(layer)
        if source_dir != layer and _is_opaque(source_dir):
            for child in list(dest_dir.iterdir()):
                remove_path(child)
        for name in dirnames + filenames:
            source = source_dir / name
            dest = dest_dir / name
            st = os.lstat(source)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                remove_path(dest)  # an overlay whiteout
                continue
            existing = lstat_or_none(dest)
            if stat.S_ISDIR(st.st_mode):
                if existing is not None and not stat.S_ISDIR(existing.st_mode):
                    remove_path(dest)
                    existing = None
                if existing is None:
                    dest.mkdir()
                _copy_metadata(source, dest, st)
                dir_sources[dest] = source
                continue
            if existing is not None:
                remove_path(dest)
            _copy_entry(source, dest, st, links)
        # os.walk lists symlinks to directories as directories; never descend into them.
        dirnames[:] = [d for d in dirnames if not (source_dir / d).is_symlink()]


def _copy_entry(
    source: Path, dest: Path, st: os.stat_result, links: dict[tuple[int, int], Path]
) -> None:
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links and not stat.S_ISLNK(st.st_mode):
        os.link(links[key], dest)
        return
    mode = st.st_mode
    if stat.S_ISREG(mode):
        shutil.copyfile(source, dest, follow_symlinks=False)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), dest)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        os.mknod(dest, mode, st.st_rdev)
    elif stat.S_ISSOCK(mode):
        return  # sockets cannot be copied and mean nothing in a new root
    else:
        raise ServinError(f"cannot copy {source}: unsupported file type {stat.S_IFMT(mode):o}")
    _copy_metadata(source, dest, st)
    if st.st_nlink > 1:
        links[key] = dest


def _copy_metadata(source: Path, dest: Path, st: os.stat_result) -> None:
    # chown clears setuid/setgid, so the mode comes after it.
    os.lchown(dest, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(source, follow_symlinks=False):
        if name.startswith(_OVERLAY_XATTR_PREFIX):
            continue
        value = os.getxattr(source, name, follow_symlinks=False)
        os.setxattr(dest, name, value, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _is_opaque(directory: Path) -> bool:
    try:
        return os.getxattr(directory, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise
