"""Drift of a scored day against the model's calibration sample.

The calibration sample is the held-out validation split scored at training time with the
production estimator (same K and seed); the model keeps its score quantiles, the threshold's
quantile level and, per feature, the share of calibration records whose `top_features` name it.
A day is summarised by `DayStats` (mergeable counts: rows, flagged rows, scores binned on the
calibration quantiles, per-feature `top_features` counts), built where the rows are scored and
combined across workers. `assess` compares the two with three tests, each a two-sample test
that counts the calibration sample's own size `m` as well as the day's `n` (the threshold and
the quantiles are estimates from m rows; a one-sample test would treat them as exact and
alarm on perfectly normal days):

- flagged rate: the day's share of `is_anomaly` against 1 - q, the share the threshold flags
  in calibration; a pooled two-proportion z-test, variance p(1-p)(1/n + 1/m) with p the rate
  of both samples together;
- score distribution: the two-sample Kolmogorov-Smirnov statistic D between the day's scores
  and the calibration scores, read at the calibration quantiles (so D is a lower bound of the
  exact one and the test errs towards silence), p-value from Kolmogorov's limit law with the
  effective size nm/(n+m); the population stability index over calibration deciles is
  reported too, as a description (not tested);
- per feature: the day's share of records whose `top_features` name the feature against the
  calibration share, a two-proportion z-test each.

Every p-value is compared with ALPHA divided by the number of tests made (Bonferroni), so the
chance that an in-distribution day alarms is at most ALPHA, whatever the number of features.
The alarm is raised when any test rejects. The statistics, p-values and thresholds are
written into the day's manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ALPHA = 1e-3  # family-wise false-alarm rate per day
PSI_BINS = 10


@dataclass
class DayStats:
    """Mergeable counts of one day's scored rows."""

    rows: int = 0
    flagged: int = 0
    below: list[int] = field(default_factory=list)  # per calibration quantile: scores <= it
    feature_counts: list[int] = field(default_factory=list)  # records naming each feature

    @classmethod
    def empty(cls, quantiles: int, features: int) -> DayStats:
        return cls(0, 0, [0] * quantiles, [0] * features)

    def add(
        self,
        scores: np.ndarray,
        flagged: np.ndarray,
        quantiles: np.ndarray,
        named: np.ndarray,
    ) -> None:
        """`scores` (n,), `flagged` (n,) bool, `named` (n, F) bool: which features each
        record's top_features list; rows with a NaN score are not counted."""
        ok = np.isfinite(scores)
        scores, flagged, named = scores[ok], flagged[ok], named[ok]
        self.rows += int(scores.size)
        self.flagged += int(np.count_nonzero(flagged))
        below = np.searchsorted(np.sort(scores), quantiles, side="right")
        self.below = (np.asarray(self.below, dtype=np.int64) + below).tolist()
        counts = named.sum(axis=0)
        self.feature_counts = (np.asarray(self.feature_counts, dtype=np.int64) + counts).tolist()

    def merge(self, other: DayStats) -> DayStats:
        return DayStats(
            self.rows + other.rows,
            self.flagged + other.flagged,
            [a + b for a, b in zip(self.below, other.below, strict=True)],
            [a + b for a, b in zip(self.feature_counts, other.feature_counts, strict=True)],
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DayStats:
        return cls(**d)


@dataclass(frozen=True)
class Reference:
    """What a run's day is compared with: the model's calibration, as the run scores."""

    levels: tuple[float, ...]
    quantiles: tuple[float, ...]
    threshold_quantile: float  # the run's
    expected_rate: float  # the share of calibration rows the run's flag rule flags
    rows: int  # calibration rows
    features: tuple[str, ...]
    shares: tuple[float, ...] | None  # calibration top_features share per feature
    not_comparable: str = ""  # why the run's scores cannot be compared ("" when they can)

    @classmethod
    def of(
        cls,
        calibration,
        features,
        *,
        threshold_quantile: float,
        k: int,
        model_k: int,
        flag_rule: str | None = None,
    ):
        shares = calibration.top_feature_share
        return cls(
            levels=tuple(calibration.levels),
            quantiles=tuple(calibration.quantiles),
            threshold_quantile=threshold_quantile,
            expected_rate=calibration.flagged_share(threshold_quantile, flag_rule),
            rows=calibration.rows,
            features=tuple(features),
            shares=None if shares is None else tuple(shares),
            not_comparable=""
            if k == model_k
            else f"scored with K={k}, the calibration with K={model_k}: IWAE scores of "
            "different K are not on one scale",
        )

    def empty_stats(self) -> DayStats:
        return DayStats.empty(len(self.quantiles), len(self.features))

    def assess(self, stats: DayStats, alpha: float = ALPHA) -> dict:
        if self.not_comparable:
            return {"alarm": False, "assessed": False, "why": self.not_comparable}
        return assess(
            stats,
            list(self.levels),
            self.expected_rate,
            self.rows,
            list(self.features),
            None if self.shares is None else list(self.shares),
            alpha,
        )


def two_proportion(k: int, n: int, p0: float, m: int) -> tuple[float, float]:
    """(z, two-sided p) for a share k/n against a share p0 measured on m records: the pooled
    two-proportion z-test (under no drift both samples share one rate, estimated from both)."""
    pooled = (k + p0 * m) / (n + m)
    variance = pooled * (1.0 - pooled) * (1.0 / n + 1.0 / m)
    if variance <= 0:
        return 0.0, 1.0  # both shares 0 (or both 1): nothing differs
    z = (k / n - p0) / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def kolmogorov_p(statistic: float, n: int, m: int) -> float:
    """Asymptotic two-sample KS p-value: Q(sqrt(nm/(n+m)) D) with Kolmogorov's
    Q(t) = 2 sum_j (-1)^(j-1) exp(-2 j^2 t^2)."""
    t = math.sqrt(n * m / (n + m)) * statistic
    if t < 0.2:
        return 1.0
    total = sum((-1) ** (j - 1) * math.exp(-2.0 * j * j * t * t) for j in range(1, 101))
    return float(min(max(2.0 * total, 0.0), 1.0))


def psi(day_shares: np.ndarray, expected: np.ndarray) -> float:
    eps = 1e-6
    a, e = np.maximum(day_shares, eps), np.maximum(expected, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def assess(
    stats: DayStats,
    levels: list[float],
    expected_rate: float,
    calibration_rows: int,
    feature_names: list[str],
    calibration_shares: list[float] | None,
    alpha: float = ALPHA,
) -> dict:
    """The drift section of a manifest: {"alarm": bool, "reasons": [...], statistics...}."""
    n, m = stats.rows, calibration_rows
    if n == 0 or m == 0:
        return {"alarm": False, "assessed": False, "why": "no scored rows to compare"}
    levels_arr = np.asarray(levels)
    day_cdf = np.asarray(stats.below, dtype=np.float64) / n
    tests = 2 + (len(feature_names) if calibration_shares is not None else 0)
    cut = alpha / tests

    z, p_rate = two_proportion(stats.flagged, n, expected_rate, m)
    flagged = {
        "rate": stats.flagged / n,
        "expected_rate": expected_rate,
        "z": z,
        "p_value": p_rate,
    }

    d = float(np.max(np.abs(day_cdf - levels_arr)))
    p_ks = kolmogorov_p(d, n, m)
    deciles = np.linspace(0.0, 1.0, PSI_BINS + 1)
    day_at = np.interp(deciles, levels_arr, day_cdf)
    day_at[0], day_at[-1] = 0.0, 1.0  # below the smallest / above the largest quantile
    scores = {
        "ks_statistic": d,
        "p_value": p_ks,
        "psi_deciles": psi(np.diff(day_at), np.diff(deciles)),
    }

    reasons = []
    if p_rate < cut:
        reasons.append(f"flagged rate {flagged['rate']:.4f}, expected {expected_rate:.4f}")
    if p_ks < cut:
        reasons.append(f"score distribution moved (KS D = {d:.3f})")
    features = []
    if calibration_shares is not None:
        for name, count, share in zip(
            feature_names, stats.feature_counts, calibration_shares, strict=True
        ):
            zf, pf = two_proportion(count, n, share, m)
            features.append(
                {
                    "feature": name,
                    "share": count / n,
                    "calibration_share": share,
                    "z": zf,
                    "p_value": pf,
                }
            )
            if pf < cut and zf > 0:
                reasons.append(f"{name} named by top_features in {count / n:.1%} of records "
                               f"(calibration {share:.1%})")  # fmt: skip
    return {
        "alarm": bool(reasons),
        "assessed": True,
        "reasons": reasons,
        "rows": n,
        "calibration_rows": m,
        "alpha": alpha,
        "p_value_threshold": cut,
        "flagged": flagged,
        "scores": scores,
        "features": features,
    }


def named_features(top_features: pa.Array | pa.ChunkedArray, names: list[str]) -> np.ndarray:
    """(n, F) bool: which features each record's `top_features` list names."""
    if isinstance(top_features, pa.ChunkedArray):
        top_features = top_features.combine_chunks()
    named = np.zeros((len(top_features), len(names)), dtype=bool)
    if len(top_features) == 0:
        return named
    rows = pc.list_parent_indices(top_features).to_numpy(zero_copy_only=False)
    entries = pc.list_flatten(top_features).field("feature")
    index = pc.index_in(entries, value_set=pa.array(names, pa.string()))
    known = index.is_valid().to_numpy(zero_copy_only=False)
    named[rows[known], index.to_numpy(zero_copy_only=False)[known].astype(np.int64)] = True
    return named
