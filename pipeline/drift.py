"""The day's drift statistics, computed where the rows are written: each bundle of the output
sink (pipeline/outputs.py) sums its scored rows into a small `DayStats` (rows, flagged rows,
scores binned on the calibration quantiles, per-feature top_features counts); the sink's
finalising step merges them and writes one JSON file next to the staged output. The launcher
reads it at commit and writes the assessment (model/calibration/drift.py) into the manifest. A
finalising
step that runs again rewrites the same file with the same content."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from vaewatch.model.calibration.drift import DayStats, Reference, named_features
from vaewatch.model.contract import Baseline

STATS_FILE = "_drift_stats.json"


class DayStatsOf:
    """Scored Arrow tables -> the day's DayStats against `reference`'s quantiles and features."""

    def __init__(self, reference: Reference):
        self._reference = reference
        self._quantiles = np.asarray(reference.quantiles)
        self._features = list(reference.features)

    def empty(self) -> DayStats:
        return self._reference.empty_stats()

    def add(self, stats: DayStats, table: pa.Table) -> DayStats:
        scores, flagged = table["anomaly_score"].to_numpy(), table["is_anomaly"].to_numpy()
        named = named_features(table["top_features"], self._features)
        stats.add(scores, flagged, self._quantiles, named)
        if self._reference.segments:  # each segment's records, against its own quantiles
            judged = pc.cast(table["baseline"], pa.string())
            for value, reference in self._reference.segments.items():
                rows = pc.equal(judged, Baseline.label(value)).to_numpy(zero_copy_only=False)
                if not rows.any():
                    continue
                part = stats.segments.setdefault(value, reference.empty_stats())
                part.add(scores[rows], flagged[rows], np.asarray(reference.quantiles), named[rows])
        return stats

    def merge(self, parts: Iterable[DayStats]) -> DayStats:
        return functools.reduce(DayStats.merge, parts, self.empty())


def write_stats(stats: DayStats, path: str) -> str:
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(stats.to_json()).encode())
    return path


def read_stats(path: str) -> DayStats | None:
    """The statistics a run wrote; None when there are none (an older pipeline)."""
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return DayStats.from_json(json.loads(handle.read()))
