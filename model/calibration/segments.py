"""Baselines per segment: a threshold, score quantiles and drift reference for each value of one
column (`train --segment-column COL`), so that a 300 EUR grocery basket and a 300 EUR
electronics order are each judged against their own kind.

The model is one model for every segment, and the segment column is one of its features: it
learns the joint distribution, so a record's log-likelihood already says how unusual it is
*given* its segment. What differs between segments is the spread of those scores: a segment
whose normal records are varied (many merchants, wide amounts) scores lower on all of them than
one whose records are alike. One global threshold then spends the flag budget on the varied
segment's normal records and misses the alike segment's anomalies. A segment's baseline is the
global calibration (`Calibration.for_rows`) with the score distribution of that segment's
validation rows alone: its quantiles (the percentile), its tails and threshold (the flag at the
same quantile q), and its share of each feature in top_features (the drift check). The anomaly
score's definition stays global, so scores compare across segments; only where each segment's
1 - q starts differs.

A value gets its own baseline with at least MIN_SEGMENT_ROWS validation rows: the 99 % quantile
of fewer rows moves by more than the gap it is meant to find (with 1,000 rows ten lie above it).
Every other record is judged by the global baseline and says why in the `baseline` column
(contract.Baseline): a value outside the model's vocabulary (never seen in training, or too
rare to keep), a null value, or a value with too few validation rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch

from vaewatch.model.calibration.scores import DISTRIBUTION_FIELDS, Calibration
from vaewatch.model.contract import Baseline
from vaewatch.model.data.features import FeatureKind, FeatureSpec
from vaewatch.model.errors import UserError, setting

MIN_SEGMENT_ROWS = 1000  # validation rows a value needs for a baseline of its own
# the fields a segment holds of its own: the distribution, and its drift reference's shares
SEGMENT_FIELDS = (*DISTRIBUTION_FIELDS, "top_feature_share")


@dataclass
class Segments:
    """The per-segment baselines of a model: `column` (a categorical feature), each value with
    enough validation rows and its baseline's own fields (SEGMENT_FIELDS), and the validation
    rows of every value that had too few."""

    column: str
    min_rows: int
    values: dict[str, dict] = field(default_factory=dict)  # value -> its SEGMENT_FIELDS
    small: dict[str, int] = field(default_factory=dict)  # value -> validation rows (< min_rows)

    def calibrations(self, calibration: Calibration) -> dict[str, Calibration]:
        """Each segment's baseline: `calibration` (the global one) with its own fields."""
        return {value: replace(calibration, **own) for value, own in self.values.items()}

    def labels(self) -> list[str]:
        """The `baseline` column's dictionary: the global markers, then each segment's label."""
        return [*(b.value for b in Baseline), *(Baseline.label(v) for v in self.values)]

    def assign(self, spec: FeatureSpec, x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """(B,) int32 index into `labels()` of the baseline that judges each record."""
        j = spec.names().index(self.column)
        vocabulary = spec.features[j].vocabulary
        codes = x[:, j].to(torch.int64).cpu().numpy()
        observed = mask[:, j].cpu().numpy()
        markers = {b: i for i, b in enumerate(Baseline)}
        # per code (the vocabulary, then the out-of-vocabulary bucket): its label's index
        own = {value: len(Baseline) + i for i, value in enumerate(self.values)}
        by_code = np.array(
            [own.get(value, markers[Baseline.SMALL_SEGMENT]) for value in vocabulary]
            + [markers[Baseline.UNSEEN_SEGMENT]],
            dtype=np.int32,
        )
        out = by_code[np.clip(codes, 0, len(vocabulary))]
        out[~observed] = markers[Baseline.NULL_SEGMENT]
        return out

    def to_json(self) -> dict:
        return {"column": self.column, "min_rows": self.min_rows, "values": self.values,
                "small": self.small}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict | None) -> Segments | None:
        if d is None:
            return None
        return cls(d["column"], int(d["min_rows"]), dict(d["values"]), dict(d["small"]))


def check_column(spec: FeatureSpec, column: str) -> int:
    """The index of `column` among the model's features; a UserError unless it is one of them
    and categorical (a segment is a value, not a range)."""
    names = spec.names()
    if column not in names:
        raise UserError(
            f"{setting('segment_column', column)}: {column!r} is not a feature of the model "
            f"(its features: {', '.join(names)}). The segment column must be one of them: do not "
            "exclude it, and leave it out of the id column"
        )
    feature = spec.features[names.index(column)]
    if feature.kind is not FeatureKind.CATEGORICAL:
        raise UserError(
            f"{setting('segment_column', column)}: {column!r} is read as {feature.kind.value}; a "
            f"segment column must be categorical (a string column, or an integer one named in "
            f"{setting('categorical', column)})"
        )
    return names.index(column)


def fit_segments(
    calibration: Calibration,
    spec: FeatureSpec,
    column: str,
    codes: np.ndarray,
    observed: np.ndarray,
    scores: np.ndarray,
    terms: np.ndarray,
    named: np.ndarray,
    min_rows: int = MIN_SEGMENT_ROWS,
) -> Segments:
    """The segments of `column` from the validation rows: `codes` and `observed` (n,) its
    encoded values, `scores` (n,) the completed anomaly scores, `terms` (n, T) as
    Calibration.fit takes them, `named` (n, F) bool which features each row's top_features
    names (as scoring names them)."""
    j = check_column(spec, column)
    vocabulary = spec.features[j].vocabulary
    segments = Segments(column, int(min_rows))
    finite = np.isfinite(scores)
    for code, value in enumerate(vocabulary):
        rows = observed & (codes == code) & finite
        count = int(rows.sum())
        if count < min_rows:
            if count:
                segments.small[value] = count
            continue
        own = calibration.for_rows(scores[rows], terms[rows])
        share = named[rows].sum(axis=0) / count
        fields = {name: getattr(own, name) for name in DISTRIBUTION_FIELDS}
        segments.values[value] = {**fields, "top_feature_share": share.tolist()}
    return segments


def baseline_column(labels: list[str], index: np.ndarray) -> pa.DictionaryArray:
    """The `baseline` column: `index` into `labels`, dictionary-encoded."""
    return pa.DictionaryArray.from_arrays(
        pa.array(np.asarray(index, dtype=np.int32)), pa.array(labels, pa.string())
    )
