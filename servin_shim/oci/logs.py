"""The CRI container log format that kubelet reads.

Each record is ``<RFC3339Nano timestamp> <stdout|stderr> <F|P> <text>\\n``. A line longer than
``max_line`` bytes is cut into ``P`` (partial) records followed by one ``F`` record, so kubelet
can join the pieces. The container's own line end is replaced by the record's LF. Output that
ends without a newline when the stream closes is written as ``P``, as containerd does.

kubelet rotates the file itself (rename, then ReopenContainerLog). With ``LogRotation.max_size``
set the writer also rotates on its own, at record boundaries: ``<log>`` becomes ``<log>.1``, the
older ``<log>.N`` move up by one and the oldest beyond ``max_files`` is deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Maximum text of one record, in bytes: the default of containerd's
#: ``max_container_log_line_size``.
DEFAULT_MAX_LINE = 16 * 1024


@dataclass(frozen=True)
class LogRotation:
    """Size-based rotation of container logs by the daemon, from ``container.logMaxSize``."""

    #: Size in bytes at which the log file is rotated; 0 turns rotation off.
    max_size: int = 0
    #: Number of files kept per container, the current one included (at least 1).
    max_files: int = 1


def rfc3339_nano(now: datetime.datetime | None = None) -> bytes:
    """Format a UTC time with nine fraction digits, as kubelet's log parser accepts."""
    now = now or datetime.datetime.now(datetime.UTC)
    ns = now.microsecond * 1000
    return now.strftime("%Y-%m-%dT%H:%M:%S").encode() + b".%09dZ" % ns


class CRILogWriter:
    """Appends records to one container log file; shared by the stdout and stderr pumps."""

    def __init__(
        self, path: Path, *, max_line: int = DEFAULT_MAX_LINE,
        rotation: LogRotation | None = None,
    ) -> None:
        self.path = path
        self.max_line = max_line
        self.rotation = rotation or LogRotation()
        self._fd = -1
        self._size = 0
        self._regular = False
        self._pending: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.open()

    def open(self) -> None:
        """Open (or create) the log file at its path; used again after kubelet rotates it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        info = os.fstat(fd)
        old, self._fd = self._fd, fd
        # Only a regular file is rotated: an infra container's log is /dev/null.
        self._regular = stat.S_ISREG(info.st_mode)
        self._size = info.st_size
        if old >= 0:
            os.close(old)

    def reopen(self) -> None:
        """Start a new file at the log path after kubelet renamed the current one.

        Records are written whole from the event loop, so every record lands completely in
        either the renamed file or the new one.
        """
        self.open()
        log.debug("reopened container log path=%s", self.path)

    def rotate(self) -> None:
        """Shift ``<log>.N`` to ``<log>.N+1``, the current file to ``<log>.1``, and reopen."""
        keep = max(self.rotation.max_files, 1) - 1
        try:
            if keep == 0:
                # Keeping one file means starting it again empty.
                os.truncate(self.path, 0)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}.{keep}")
                for index in range(keep - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(f"{self.path}.{index}", f"{self.path}.{index + 1}")
                os.rename(self.path, f"{self.path}.1")
            self.open()
        except OSError as exc:
            log.error("failed to rotate container log path=%s: %s", self.path, exc)

    def feed(self, stream: str, data: bytes) -> None:
        """Write every complete line in ``data``; keep an unfinished tail for the next call."""
        buf = self._pending[stream] + data
        records: list[bytes] = []
        stamp = rfc3339_nano()
        while True:
            newline = buf.find(b"\n")
            if newline < 0 or newline > self.max_line:
                if len(buf) > self.max_line:
                    records.append(self._record(stamp, stream, b"P", buf[: self.max_line]))
                    buf = buf[self.max_line :]
                    continue
                break
            line = buf[:newline]
            if line.endswith(b"\r"):
                line = line[:-1]
            records.append(self._record(stamp, stream, b"F", line))
            buf = buf[newline + 1 :]
        self._pending[stream] = buf
        if records:
            self._write_records(records)

    def flush_partial(self, stream: str) -> None:
        """Write an unfinished line as a ``P`` record, for a stream that has ended."""
        tail = self._pending[stream]
        if tail:
            self._pending[stream] = b""
            self._write_records([self._record(rfc3339_nano(), stream, b"P", tail)])

    def close(self) -> None:
        for stream in self._pending:
            self.flush_partial(stream)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write_records(self, records: list[bytes]) -> None:
        """Write records, rotating the file first wherever the next one would overflow it."""
        max_size = self.rotation.max_size
        if max_size <= 0 or not self._regular:
            self._write(b"".join(records))
            return
        batch: list[bytes] = []
        batch_size = 0
        for record in records:
            # A record larger than max_size still goes into one file of its own.
            if self._size + batch_size + len(record) > max_size and self._size + batch_size > 0:
                if batch:
                    self._write(b"".join(batch))
                    batch, batch_size = [], 0
                self.rotate()
            batch.append(record)
            batch_size += len(record)
        if batch:
            self._write(b"".join(batch))

    @staticmethod
    def _record(stamp: bytes, stream: str, tag: bytes, text: bytes) -> bytes:
        return b"%s %s %s %s\n" % (stamp, stream.encode(), tag, text)

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError as exc:
            # Losing the log file must not stop the pumps: the container would block on a full
            # pipe. Say so once per failure and keep draining.
            log.error("failed to write container log path=%s: %s", self.path, exc)
