"""The CRI container log format that kubelet reads.

Each record is ``<RFC3339Nano timestamp> <stdout|stderr> <F|P> <text>\\n``. A line longer than
``max_line`` bytes is cut into ``P`` (partial) records followed by one ``F`` record, so kubelet
can join the pieces; the container's own line end is replaced by the record's LF. Output that
ends without a newline when the stream closes is written as ``P``, as containerd does.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: Longest text of one record, in bytes: the default of containerd's
#: ``max_container_log_line_size``.
DEFAULT_MAX_LINE = 16 * 1024


def rfc3339_nano(now: datetime.datetime | None = None) -> bytes:
    """Format a UTC time with nine fraction digits, as kubelet's log parser accepts."""
    now = now or datetime.datetime.now(datetime.UTC)
    ns = now.microsecond * 1000
    return now.strftime("%Y-%m-%dT%H:%M:%S").encode() + b".%09dZ" % ns


class CRILogWriter:
    """Appends records to one container log file; shared by the stdout and stderr pumps."""

    def __init__(self, path: Path, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.path = path
        self.max_line = max_line
        self._fd = -1
        self._pending: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.open()

    def open(self) -> None:
        """Open (or create) the log file at its path; used again after kubelet rotates it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def reopen(self) -> None:
        self.open()

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
            self._write(b"".join(records))

    def flush_partial(self, stream: str) -> None:
        """Write an unfinished line as a ``P`` record, for a stream that has ended."""
        tail = self._pending[stream]
        if tail:
            self._pending[stream] = b""
            self._write(self._record(rfc3339_nano(), stream, b"P", tail))

    def close(self) -> None:
        for stream in self._pending:
            self.flush_partial(stream)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def _record(stamp: bytes, stream: str, tag: bytes, text: bytes) -> bytes:
        return b"%s %s %s %s\n" % (stamp, stream.encode(), tag, text)

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            # Losing the log file must not stop the pumps: the container would block on a full
            # pipe. Say so once per failure and keep draining.
            log.error("failed to write container log path=%s: %s", self.path, exc)
