"""Persistent network namespaces for pod sandboxes.

A pod's network namespace is bind-mounted on a file under ``<state dir>/netns``, as ``ip netns``
and the CRI plugins do, so it lives independently of the infra process: CNI plugins can be run
against its path before the infra starts and after it stops.
"""

from __future__ import annotations

import logging
from pathlib import Path

from servin_shim.errors import ServinError
from servin_shim.oci.reaper import Reaper
from servin_shim.oci.rootfs import is_mountpoint, unmount

log = logging.getLogger(__name__)


class NetworkNamespaces:
    """Creates and removes the namespace files under one directory."""

    def __init__(self, directory: Path, reaper: Reaper) -> None:
        self.directory = directory
        self._reaper = reaper

    def path(self, sandbox_id: str) -> Path:
        return self.directory / sandbox_id

    async def create(self, sandbox_id: str) -> Path:
        """Create a new network namespace with loopback up and return its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(sandbox_id)
        if path.exists() and is_mountpoint(path):
            return path
        path.touch()
        # unshare(1) creates the namespace and bind-mounts it on the file in one step.
        await self._check(["unshare", f"--net={path}", "true"], sandbox_id)
        try:
            await self._check(
                ["nsenter", f"--net={path}", "ip", "link", "set", "lo", "up"], sandbox_id
            )
        except ServinError:
            self.remove(sandbox_id)
            raise
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

    async def _check(self, argv: list[str], sandbox_id: str) -> None:
        result = await self._reaper.run(argv, timeout=30)
        if result.returncode != 0:
            raise ServinError(
                f"failed to set up network namespace for sandbox {sandbox_id}: "
                f"{' '.join(argv)}: {result.stderr.decode(errors='replace').strip()}"
            )
