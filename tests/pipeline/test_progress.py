"""Workers' progress lines: per finished input split, exact counts across batches."""

import logging

import numpy as np
import pyarrow as pa

from vaewatch.pipeline import progress


def test_finished_lines_count_each_split_across_batches(caplog):
    """Two splits whose rows arrive over three batches (one batch mixing both), with rejected
    rows at known positions: one line per split once all its rows are in, with exact counts."""
    a = progress.source_label("a.parquet (row groups 0-0)", 5, started=0.0)
    b = progress.source_label("b", 4, started=0.0)
    tracker = progress.Progress(interval=1e9)
    caplog.set_level(logging.INFO, logger="vaewatch.progress")

    def batch(*parts):
        return pa.chunked_array([progress.source_column(label, n) for label, n in parts])

    tracker.add_sources(batch((a, 3)), np.array([1]))
    assert not [r for r in caplog.records if r.getMessage().startswith("finished")]
    tracker.add_sources(batch((a, 2), (b, 1)), np.array([0, 2]))  # a's 4th row, b's 1st row
    tracker.add_sources(batch((b, 3)), np.array([], dtype=np.int64))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finished")]
    assert [line.split(",")[0:3] for line in lines] == [
        ["finished a.parquet (row groups 0-0): 5 rows", " 3 scored", " 2 rejected"],
        ["finished b: 4 rows", " 3 scored", " 1 rejected"],
    ]
    assert tracker.sources == {}


def test_a_splits_rate_runs_from_the_start_of_its_read(caplog, monkeypatch):
    """A split read and scored in one batch: its rows/s is its rows over the time since its read
    began (a clock set by hand), not over the instant between receiving and finishing it."""
    clock = [1_000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    label = progress.source_label("day.parquet (row groups 0-3)", 1_454, started=clock[0])
    clock[0] += 2.0  # read, scored: two seconds later the batch is accounted
    tracker = progress.Progress(interval=1e9)
    caplog.set_level(logging.INFO, logger="vaewatch.progress")
    tracker.add_sources(pa.chunked_array([progress.source_column(label, 1_454)]), np.array([]))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finished")]
    assert line == (
        "finished day.parquet (row groups 0-3): 1,454 rows, 1,454 scored, 0 rejected, 727 rows/s"
    )
