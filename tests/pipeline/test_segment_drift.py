"""Drift per segment through the pipeline's day statistics (pipeline/drift.py DayStatsOf):
each segment's records counted against its own quantiles, each tested against its own
reference at a Bonferroni level (model/calibration/drift.py)."""

import pyarrow as pa
import pyarrow.compute as pc

from vaewatch.model.calibration.drift import ALPHA, DayStats, Reference
from vaewatch.model.scoring import Scorer
from vaewatch.model.synthetic import segmented
from vaewatch.pipeline.drift import DayStatsOf


def test_drift_is_tested_per_segment_at_a_bonferroni_level(segmented_model):
    """Kiosk readings spread twice as wide, markets as in training: the kiosk segment alarms
    (its bulk moved); the market segment does not; each test runs at alpha / 3."""
    artifact = segmented_model
    reference = Reference.of(
        artifact.calibration, artifact.spec.names(), threshold_quantile=0.99, k=artifact.scoring.k,
        model_k=artifact.scoring.k, segments=artifact.calibrations(),
    )  # fmt: skip
    day = segmented(20000, seed=12)
    kiosk = pc.equal(day["store"], "kiosk").to_numpy(zero_copy_only=False)
    columns = {}
    for j in range(4):
        values = day[f"r{j}"].to_numpy().copy()
        values[kiosk] = 10.0 + (values[kiosk] - 10.0) * 1.6
        columns[f"r{j}"] = values
    for name, values in columns.items():
        day = day.set_column(day.schema.get_field_index(name), name, pa.array(values))
    scored = Scorer(artifact, model_version="t", device="cpu").score(day).scores
    counter = DayStatsOf(reference)
    stats = counter.merge([counter.add(counter.empty(), scored)])
    result = reference.assess(stats)
    assert result["p_value_threshold"] <= ALPHA / 3
    assert result["segments"]["kiosk"]["alarm"] and not result["segments"]["market"]["alarm"]
    assert result["alarm"] and any(r.startswith("segment kiosk:") for r in result["reasons"])
    calm = Scorer(artifact, model_version="t", device="cpu").score(segmented(20000, seed=13))
    quiet = reference.assess(counter.merge([counter.add(counter.empty(), calm.scores)]))
    assert not quiet["alarm"], quiet["reasons"]


def test_day_statistics_per_segment_merge_and_round_trip():
    a = DayStats(2, 1, [1, 2], [1, 0], [0, 0], {"x": DayStats(1, 0, [0, 1], [1, 0], [1, 0])})
    b = DayStats(
        3,
        0,
        [2, 3],
        [0, 1],
        [0, 1],
        {"x": DayStats(2, 1, [1, 2], [0, 0], [0, 0]), "y": DayStats(1, 0, [1, 1], [0, 1], [0, 1])},
    )
    merged = a.merge(b)
    assert merged.segments["x"] == DayStats(3, 1, [1, 3], [1, 0], [1, 0])
    assert merged.segments["y"] == b.segments["y"] and merged.rows == 5
    assert DayStats.from_json(merged.to_json()) == merged
