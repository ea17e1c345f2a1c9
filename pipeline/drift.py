"""The day's drift statistics, computed where the rows are scored: one small accumulator per
worker (rows, flagged rows, scores binned on the calibration quantiles, per-feature
top_features counts), combined globally and written as one JSON file next to the staged output.
The launcher reads it at commit and writes the assessment (model/drift.py) into the manifest.
A retried bundle rewrites the same file with the same content."""

from __future__ import annotations

import functools
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from vaewatch.model.drift import DayStats, Reference, named_features

STATS_FILE = "_drift_stats.json"


class DayStatsFn(beam.CombineFn):
    """Scored Arrow tables -> the day's DayStats as JSON."""

    def __init__(self, reference: Reference):
        self._quantiles = list(reference.quantiles)
        self._features = list(reference.features)

    def create_accumulator(self) -> DayStats:
        return DayStats.empty(len(self._quantiles), len(self._features))

    def add_input(self, stats: DayStats, table: pa.Table) -> DayStats:
        stats.add(
            table["anomaly_score"].to_numpy(),
            table["is_anomaly"].to_numpy(),
            np.asarray(self._quantiles),
            named_features(table["top_features"], self._features),
        )
        return stats

    def merge_accumulators(self, accumulators) -> DayStats:
        return functools.reduce(DayStats.merge, accumulators, self.create_accumulator())

    def extract_output(self, stats: DayStats) -> dict:
        return stats.to_json()


def _write(stats: dict, path: str) -> str:
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(stats).encode())
    return path


class WriteDayStats(beam.PTransform):
    """PCollection of scored tables -> one JSON file at `path` with the day's statistics."""

    def __init__(self, reference: Reference, path: str):
        super().__init__()
        self._reference, self._path = reference, path

    def expand(self, tables):
        return (
            tables
            | "Combine" >> beam.CombineGlobally(DayStatsFn(self._reference))
            | "Write" >> beam.Map(_write, self._path)
        )


def read_stats(path: str) -> DayStats | None:
    """The statistics a run wrote; None when there are none (an older pipeline)."""
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return DayStats.from_json(json.loads(handle.read()))
