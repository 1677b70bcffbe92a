"""Progress of one image pull: byte and layer counts, periodic log lines and the stall watchdog.

The watchdog cancels a pull that has shown no activity for ``stall_timeout`` seconds. Activity
is a received chunk of any blob or manifest, or an entry written by the layer unpacker, so a
slow but moving download or a long unpack is never cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

# Seconds between two info lines about a running pull.
LOG_INTERVAL_SECONDS = 5.0


class PullProgress:
    """Counters of one pull, updated by downloads (event loop) and unpacks (worker threads)."""

    def __init__(self, ref: str, stall_timeout: float) -> None:
        self.ref = ref
        self.stall_timeout = stall_timeout
        self.started = time.monotonic()
        self.last_activity = self.started
        self.layers_total = 0
        self.layers_done = 0
        self.bytes_total = 0
        self.bytes_received = 0
        self.endpoint = ""
        self.stalled = False

    def add_bytes(self, count: int) -> None:
        self.bytes_received += count
        self.last_activity = time.monotonic()

    def touch(self) -> None:
        """Record activity that moves no bytes, such as an unpacked tar entry."""
        # A float store is atomic under the GIL, so worker threads may call this.
        self.last_activity = time.monotonic()

    def layer_done(self) -> None:
        self.layers_done += 1
        self.touch()

    def rate(self) -> float:
        """Return the average download rate in bytes per second since the start."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return self.bytes_received / elapsed

    def log_line(self, event: str) -> None:
        log.info(
            "%s ref=%s endpoint=%s layers=%d/%d bytes=%d/%d rate_mb_s=%.1f seconds=%.1f",
            event,
            self.ref,
            self.endpoint or "-",
            self.layers_done,
            self.layers_total,
            self.bytes_received,
            self.bytes_total,
            self.rate() / 1e6,
            time.monotonic() - self.started,
        )

    async def watch(self, pull: asyncio.Task[object]) -> None:
        """Log progress every few seconds and cancel ``pull`` once it stalls."""
        check_every = min(LOG_INTERVAL_SECONDS, max(self.stall_timeout / 4, 0.05))
        next_log = time.monotonic() + LOG_INTERVAL_SECONDS
        while not pull.done():
            await asyncio.sleep(check_every)
            now = time.monotonic()
            if now - self.last_activity > self.stall_timeout:
                self.stalled = True
                log.warning(
                    "pull stalled, cancelling ref=%s endpoint=%s idle_seconds=%.1f",
                    self.ref,
                    self.endpoint or "-",
                    now - self.last_activity,
                )
                pull.cancel()
                return
            if now >= next_log:
                self.log_line("pull progress")
                next_log = now + LOG_INTERVAL_SECONDS
