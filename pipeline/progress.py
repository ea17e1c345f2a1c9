"""Progress a scoring worker reports while it works: rows read, scored, rejected and rows/s, on
the `vaewatch.progress` logger, at most every `interval` seconds and once at the end, and a
line when each input file (or each part of a large file read in parallel) is finished. Each
worker process reports its own share; the launcher's log shows them as they come.

A file's rows are tracked by a column the reader adds (SOURCE_COLUMN: dictionary-encoded, one
entry per read split, "ROWS<TAB>STARTED<TAB>path (row groups a-b)"), which survives rebatching
(a table's chunks keep their source) and is dropped before scoring. STARTED is the wall-clock
time the read began, so a split's rows/s spans its read, scoring and hand-over to the writer
(measured from the first scored batch instead, a split read in one batch reported millions of
rows/s).

Within this process a caller can also follow the rows as they are scored (`listening`): the
`vaewatch` command draws its progress bar that way when Beam's local runner runs the one worker
in the launching process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

LOG = logging.getLogger("vaewatch.progress")
DEFAULT_INTERVAL = 30.0  # seconds between two progress lines of one worker
SOURCE_COLUMN = "__vaewatch_source"
_listeners: list[Callable[[int], None]] = []
_listeners_lock = threading.Lock()


@contextlib.contextmanager
def listening(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, `callback(rows)` after each batch a worker of this process scores
    (its input rows, scored and rejected alike). Workers in other processes (Beam's
    multi-process and remote runners) report through the log only."""
    with _listeners_lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(callback)


def source_label(name: str, rows: int, started: float) -> str:
    """`started`: time.time() when the split's read began."""
    return f"{rows}\t{started:.6f}\t{name}"


def source_column(label: str, rows: int) -> pa.DictionaryArray:
    """`rows` values all naming one split, stored once."""
    return pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(rows, dtype=np.int32)), pa.array([label], pa.string())
    )


class Progress:
    def __init__(self, interval: float = DEFAULT_INTERVAL):
        self.interval = interval
        self.rows_in = self.scored = self.rejected = 0
        self.started = self.last = time.monotonic()
        self.sources: dict[str, list] = {}  # label -> [rows seen, rejected]

    def add_sources(self, sources: pa.ChunkedArray, rejected_at: np.ndarray) -> None:
        """Account a scored batch to the splits its rows came from (`rejected_at`: positions
        of the rejected rows); log a line for each split now complete."""
        start = 0
        for chunk in sources.chunks:
            end = start + len(chunk)
            for index, label in enumerate(chunk.dictionary.to_pylist()):
                rows = int(np.count_nonzero(chunk.indices.to_numpy(zero_copy_only=False) == index))
                if not rows:
                    continue
                state = self.sources.setdefault(label, [0, 0])
                state[0] += rows
                if len(chunk.dictionary) == 1:
                    state[1] += int(np.count_nonzero((rejected_at >= start) & (rejected_at < end)))
                if state[0] >= int(label.split("\t", 1)[0]):
                    self._finished(label, *self.sources.pop(label))
            start = end

    @staticmethod
    def _finished(label: str, rows: int, rejected: int) -> None:
        _, started, name = label.split("\t", 2)
        rate = rows / max(time.time() - float(started), 1e-3)
        LOG.info(
            "finished %s: %s rows, %s scored, %s rejected, %s rows/s",
            name, f"{rows:,}", f"{rows - rejected:,}", f"{rejected:,}", f"{rate:,.0f}",
        )  # fmt: skip

    def add(self, rows_in: int, scored: int, rejected: int) -> None:
        for listener in tuple(_listeners):
            listener(rows_in)
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
