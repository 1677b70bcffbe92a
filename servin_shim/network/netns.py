"""Persistent network namespaces for pod sandboxes.

A pod's network namespace is bind-mounted on a file under ``<state dir>/netns``, as ``ip netns``
and the CRI plugins do, so it lives independently of the infra process. CNI plugins can then run
against its path before the infra starts and after it stops.

The namespace is created in the daemon itself rather than with ``unshare(1)`` and ``ip``, which
saves two process starts per pod. A short-lived thread calls ``unshare(CLONE_NEWNET)``, which
moves only that thread. It bind-mounts its namespace on the file, brings loopback up through an
ioctl on a socket inside it, and returns to the daemon's namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import os
import socket
import struct
import threading
from pathlib import Path

from servin_shim.errors import ServinError
from servin_shim.oci.rootfs import MS_BIND, is_mountpoint, mount, unmount

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def _loopback_up() -> None:
    """Set IFF_UP on ``lo`` in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _create_namespace(path: Path) -> None:
    """Create a network namespace on ``path``; runs in a thread of its own."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
        try:
            mount("/proc/thread-self/ns/net", path, "none", MS_BIND)
            _loopback_up()
        finally:
            # The thread ends right after, but it must not leave the namespace open by living
            # in it, and a failed setns must be loud.
            if _libc.setns(original, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the daemon's namespace failed: "
                                   f"{os.strerror(err)}")
    finally:
        os.close(original)


async def _in_new_thread(path: Path) -> None:
    """Run ``_create_namespace`` in a fresh thread, never a pooled one that others reuse."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def target() -> None:
        try:
            _create_namespace(path)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, done, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, None)

    threading.Thread(target=target, name="netns-create", daemon=True).start()
    await done


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


class NetworkNamespaces:
    """Creates and removes the namespace files under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, sandbox_id: str) -> Path:
        return self.directory / sandbox_id

    async def create(self, sandbox_id: str) -> Path:
        """Create a new network namespace with loopback up and return its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(sandbox_id)
        if path.exists() and is_mountpoint(path):
            return path
        path.touch()
        try:
            await _in_new_thread(path)
        except OSError as exc:
            self.remove(sandbox_id)
            raise ServinError(
                f"failed to set up network namespace for sandbox {sandbox_id}: {exc}"
            ) from exc
        log.debug("created network namespace sandbox=%s path=%s", sandbox_id, path)
        return path

    def remove(self, sandbox_id: str) -> None:
        """Unmount and delete the namespace file; a missing namespace is fine."""
        path = self.path(sandbox_id)
        if not path.exists():
            return
        unmount(path)
        path.unlink(missing_ok=True)
        log.debug("removed network namespace sandbox=%s", sandbox_id)

    def list(self) -> list[str]:
        if not self.directory.exists():
            return []
        return [p.name for p in self.directory.iterdir()]
