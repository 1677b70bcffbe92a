"""Container root filesystems: an overlayfs mount of the image's layer snapshots.

Each container gets a private upper and work directory; the image snapshots are the read-only
lower directories, so every container of an image shares them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
from pathlib import Path

from servin_shim.errors import ServinError

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MNT_DETACH = 0x2

#: Maximum length of a mount option string the kernel takes (one page); longer lowerdir lists need
#: shorter paths.
MAX_MOUNT_DATA = 4096


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
    """Call mount(2) and raise OSError with the arguments in the message on failure."""
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags,
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target} failed: {os.strerror(err)}")


def unmount(target: Path) -> bool:
    """Lazily unmount ``target``; return False if nothing was mounted there."""
    rc = _libc.umount2(str(target).encode(), MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(err, f"umount {target} failed: {os.strerror(err)}")
    return True


def is_mountpoint(path: Path) -> bool:
    """Return True if ``path`` is a mount point according to /proc/self/mountinfo."""
    target = str(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.decode("utf-8", "surrogateescape").encode().decode("unicode_escape")


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount ``lowers`` (bottom layer first) under a private upper directory at ``target``."""
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    if not lowers:
        # overlayfs needs at least one lower directory; an image without layers gets an empty one.
        empty = upper.parent / "empty"
        empty.mkdir(exist_ok=True)
        lowers = [empty]
    # overlayfs lists the topmost lower directory first.
    lowerdir = ":".join(str(p) for p in reversed(lowers))
    data = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    if len(data) >= MAX_MOUNT_DATA:
        raise ServinError(
            f"overlay mount options for {target} are {len(data)} bytes, over the kernel's limit "
            f"of {MAX_MOUNT_DATA}: the image has too many layers for this root path"
        )
    mount("overlay", target, "overlay", 0, data)


def remove_tree(path: Path) -> None:
    """Remove a directory tree that may contain files owned by any user; missing is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if path.exists():
        shutil.rmtree(path, onerror=_retry_writable)


def _retry_writable(func, path, exc_info):  # type: ignore[no-untyped-def]
    # Directories copied from images can be mode 0500; root can still chmod and retry.
    os.chmod(path, 0o700)
    func(path)
