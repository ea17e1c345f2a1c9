"""Progress a scoring worker reports while it works: rows read, scored, rejected and rows/s, on
the `vaewatch.progress` logger, at most every `interval` seconds and once at the end. Each
worker process reports its own share; the launcher's log shows them as they come."""

from __future__ import annotations

import logging
import time

LOG = logging.getLogger("vaewatch.progress")
DEFAULT_INTERVAL = 30.0  # seconds between two progress lines of one worker


class Progress:
    def __init__(self, interval: float = DEFAULT_INTERVAL):
        self.interval = interval
        self.rows_in = self.scored = self.rejected = 0
        self.started = self.last = time.monotonic()

    def add(self, rows_in: int, scored: int, rejected: int) -> None:
        self.rows_in += rows_in
        self.scored += scored
        self.rejected += rejected
        if time.monotonic() - self.last >= self.interval:
            self.report()

    def report(self, final: bool = False) -> None:
        now = time.monotonic()
        self.last = now
        rate = self.rows_in / max(now - self.started, 1e-9)
        LOG.info(
            "%s: %s rows read, %s scored, %s rejected, %s rows/s",
            "done" if final else "progress",
            f"{self.rows_in:,}",
            f"{self.scored:,}",
            f"{self.rejected:,}",
            f"{rate:,.0f}",
        )
