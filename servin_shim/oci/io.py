"""Container stdio through named pipes (FIFOs) that outlive the daemon.

The container writes to ``<io dir>/stdout`` and ``<io dir>/stderr``. Both the daemon's reading
end and the container's writing end are opened ``O_RDWR``, so each holder counts as a reader
too: while the container lives, its pipe never loses its last reader, writes never fail with
EPIPE or SIGPIPE, and output waits in the pipe buffer (then blocks the writer) until a daemon
reads it again. That is how a daemon restart loses no log line. containerd's shim and conmon
get the same effect by keeping a read end open in a process that outlives the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

from servin_shim.oci.logs import CRILogWriter

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")
READ_SIZE = 64 * 1024


def create_fifos(io_dir: Path) -> None:
    """Create the stdout and stderr FIFOs of a container (idempotent)."""
    io_dir.mkdir(parents=True, exist_ok=True)
    for name in STREAMS:
        path = io_dir / name
        if path.exists() and not stat.S_ISFIFO(path.stat().st_mode):
            path.unlink()
        if not path.exists():
            os.mkfifo(path, 0o600)


class StreamPump:
    """Copies a container's stdout and stderr FIFOs into its CRI log file."""

    def __init__(self, container_id: str, io_dir: Path, writer: CRILogWriter) -> None:
        self.container_id = container_id
        self.io_dir = io_dir
        self.writer = writer
        self._fds: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open both FIFOs and read from them whenever data arrives."""
        self._loop = loop
        for name in STREAMS:
            fd = os.open(self.io_dir / name, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self._fds[name] = fd
            loop.add_reader(fd, self._on_readable, name)

    def _on_readable(self, name: str) -> None:
        self._drain(name)

    def _drain(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is None:
            return
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                log.error("failed to read container output id=%s stream=%s: %s",
                          self.container_id, name, exc)
                return
            if not data:
                return
            self.writer.feed(name, data)

    def drain(self) -> None:
        """Read everything that is buffered in the pipes right now."""
        for name in list(self._fds):
            self._drain(name)

    def close(self) -> None:
        """Drain, stop reading, flush unfinished lines and close the log file."""
        self.drain()
        for fd in self._fds.values():
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        self.writer.close()
