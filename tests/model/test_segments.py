"""Baselines per segment (model/calibration/segments.py): each value's baseline is the global
calibration with that value's rows' distribution, by hand; a record is judged by its segment's
baseline exactly as a model whose only baseline that is would judge it, and by the global one,
marked, when its value is unseen, null or has too few rows; per-segment flags catch what one
global threshold misses at the same budget. (The model: tests/conftest.py `segmented_model`;
drift per segment: tests/pipeline/test_segment_drift.py.)"""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from vaewatch.model.calibration.scores import Calibration, quantile_levels
from vaewatch.model.calibration.segments import Segments, check_column, fit_segments
from vaewatch.model.data.features import Feature, FeatureKind, FeatureSpec
from vaewatch.model.errors import UserError
from vaewatch.model.scoring import Scorer
from vaewatch.model.synthetic import segmented

SPEC = FeatureSpec(
    [
        Feature("x", FeatureKind.CONTINUOUS),
        Feature("store", FeatureKind.CATEGORICAL, vocabulary=["a", "b", "c"]),
    ]
)


def _by_hand():
    rng = np.random.default_rng(0)
    codes = np.repeat([0, 1, 2, 0], [1500, 1200, 300, 100])  # a, b, c, and nulls coded 0
    observed = np.ones(codes.size, dtype=bool)
    observed[-100:] = False
    scores = rng.normal(np.array([0.0, 5.0, 9.0])[codes], 1.0)
    terms = rng.normal(size=(codes.size, 2))
    named = rng.random((codes.size, 2)) < 0.3
    calibration = Calibration.fit(scores, terms, 0.99, flag_rule="any")
    return calibration, codes, observed, scores, terms, named


def test_each_value_with_enough_rows_gets_its_own_distribution():
    calibration, codes, observed, scores, terms, named = _by_hand()
    segments = fit_segments(calibration, SPEC, "store", codes, observed, scores, terms, named,
                            min_rows=1000)  # fmt: skip
    assert list(segments.values) == ["a", "b"] and segments.small == {"c": 300}
    levels = quantile_levels()
    for code, value in enumerate(["a", "b"]):
        rows = observed & (codes == code)  # the nulls coded 0 are not a's
        own = segments.calibrations(calibration)[value]
        assert own.rows == rows.sum()
        np.testing.assert_array_equal(
            own.quantiles, np.maximum.accumulate(np.quantile(scores[rows], levels))
        )
        np.testing.assert_allclose(own.top_feature_share, named[rows].mean(axis=0))
        # the score's definition stays the global one's
        assert own.feature_baseline == calibration.feature_baseline
        assert own.tail_start is not None and own.flag_rule == "any"
    # b's scores sit 5 above a's: so does its threshold
    a, b = (segments.calibrations(calibration)[v].threshold() for v in "ab")
    assert 3.0 < b - a < 7.0
    restored = Segments.from_json(segments.to_json())
    assert restored == segments


def test_each_record_is_marked_with_the_baseline_that_judges_it():
    segments = Segments("store", 1000, {"a": {}, "b": {}}, {"c": 300})
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 0.0]])
    mask = torch.ones(x.shape, dtype=torch.bool)
    mask[4, 1] = False
    labels = segments.labels()
    got = [labels[i] for i in segments.assign(SPEC, x, mask)]
    assert got == ["segment=a", "segment=b", "global:small_segment", "global:unseen_segment",
                   "global:null_segment"]  # fmt: skip


def test_the_segment_column_must_be_a_categorical_feature():
    with pytest.raises(UserError, match="'amount' is not a feature of the model"):
        check_column(SPEC, "amount")
    with pytest.raises(UserError, match="read as continuous.*--categorical|categorical=x"):
        check_column(SPEC, "x")


# ------------------------------------------------------------------ a model with segments
def _day(seed=7, n=6000, anomaly_rate=0.02):
    day = segmented(n, anomaly_rate=anomaly_rate, seed=seed)
    stores = day["store"].to_pylist()
    stores[:50] = ["kiosk-2"] * 50  # a store never seen
    stores[50:100] = [None] * 50
    return day.set_column(day.schema.get_field_index("store"), "store", pa.array(stores))


def test_a_record_is_judged_as_a_model_whose_only_baseline_is_its_own(segmented_model):
    artifact = segmented_model
    assert set(artifact.segments.values) == {"kiosk", "market"}
    assert list(artifact.segments.small) == ["outlet"]
    day = _day()
    scored = Scorer(artifact, model_version="t", device="cpu").score(day).aligned()
    judged = np.asarray(scored["baseline"].cast(pa.string()).to_pylist(), dtype=object)
    store = np.asarray(day["store"].to_pylist(), dtype=object)
    expected = np.where(
        store == "kiosk",
        "segment=kiosk",
        np.where(store == "market", "segment=market", "global:small_segment"),
    ).astype(object)
    expected[:50], expected[50:100] = "global:unseen_segment", "global:null_segment"
    np.testing.assert_array_equal(judged, expected)  # fmt: skip
    alone = {"global": dataclasses.replace(artifact, segments=None)}
    for value, baseline in artifact.calibrations().items():
        alone[f"segment={value}"] = dataclasses.replace(artifact, calibration=baseline,
                                                        segments=None)  # fmt: skip
    for label, model in alone.items():
        rows = np.flatnonzero(
            judged == label if label != "global" else [j.startswith("global") for j in judged]
        )
        assert rows.size > 40, label
        own = Scorer(model, model_version="t", device="cpu").score(day.take(rows)).aligned()
        assert own["is_anomaly"].to_pylist() == scored["is_anomaly"].take(rows).to_pylist()
        for column in ("score_percentile", "anomaly_score"):  # a batch's own rows: to 1e-9
            np.testing.assert_allclose(own[column].to_numpy(), scored[column].take(rows).to_numpy(),
                                       rtol=0, atol=1e-9, err_msg=label)  # fmt: skip


def test_per_segment_flags_catch_what_a_global_threshold_misses(segmented_model):
    """Kiosk anomalies (one reading 5 kiosk spreads out) score above most market records: one
    threshold at the same number of flagged rows spends it on the markets' spread."""
    artifact = segmented_model
    day = segmented(20000, anomaly_rate=0.03, seed=11)
    store = np.asarray(day["store"].to_pylist())
    anomalous = day["is_injected_anomaly"].to_numpy(zero_copy_only=False)
    scored = Scorer(artifact, model_version="t", device="cpu").score(day).aligned()
    per_segment = scored["is_anomaly"].to_numpy(zero_copy_only=False)
    # one global threshold flagging as many rows: the same count of the highest scores
    score = scored["anomaly_score"].to_numpy(zero_copy_only=False)
    top = np.argsort(-score, kind="stable")[: per_segment.sum()]
    global_flags = np.zeros(score.size, dtype=bool)
    global_flags[top] = True
    kiosk = (store == "kiosk") & anomalous
    caught, missed = per_segment[kiosk].mean(), global_flags[kiosk].mean()
    # measured: 0.88 against 0.20
    assert caught > 0.4 and caught > missed + 0.3, (caught, missed)
