"""Drift of a scored day against the model's calibration sample, in two findings that mean
different things.

The calibration sample is the held-out validation split scored at training time with the
production estimator (same K and seed); the model keeps its score quantiles, the threshold's
quantile level and, per feature, the share of calibration records whose `top_features` name it.
A day is summarised by `DayStats` (mergeable counts: rows, flagged rows, scores binned on the
calibration quantiles, per-feature `top_features` counts), built where the rows are scored and
combined across workers. `assess` compares the two, each test a two-sample test that counts
the calibration sample's own size `m` as well as the day's `n` (the quantiles are estimates
from m rows; a one-sample test would treat them as exact and alarm on normal days).

- **Data drift** (the alarm; `--fail-on-drift`): the bulk of the day is distributed differently
  from the calibration sample. Tested on what a small share of extreme records cannot move:
  - the scores below the calibration's TRIM_LEVEL quantile, as a distribution of their own
    (the day's scores below that point against the calibration's, each conditioned on lying
    there), with the two-sample Kolmogorov-Smirnov statistic read at the calibration quantiles
    (a lower bound of the exact D, so the test errs towards silence) and Kolmogorov's limit law
    on the effective size. Anomalies score above that point and leave it alone, up to
    1 - TRIM_LEVEL of the day;
  - per feature, the share of the records *not flagged* whose `top_features` name it, against
    the calibration share (a two-proportion z-test each): a feature whose values moved is named
    more (or less) often by ordinary records, which the flagged ones cannot push.
  The whole distribution's D and its population stability index over deciles, and the shares
  over all records, are reported as descriptions, not tested: each moves with the anomalies.
- **Anomaly rate** (a notice; `--fail-on-anomaly-rate RATE` makes it one): the day's share of
  `is_anomaly` with its 95 % Wilson interval, against the budget 1 - q and the share the
  threshold flags among the calibration rows; a pooled two-proportion z-test says whether it
  is above that share. This is what the user already sees flagged, counted: a day with more
  anomalies than usual, not a model that no longer fits.

Each data-drift p-value is compared with ALPHA divided by the number of tests (Bonferroni), so
the chance that an in-distribution day alarms is at most ALPHA, whatever the number of
features. The statistics, p-values and thresholds are written into the day's manifest.
Manifests written before the split (one alarm over three tests, the flagged rate among them)
read through `findings`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ALPHA = 1e-3  # false data-drift alarms per in-distribution day
PSI_BINS = 10
# the data-drift test looks at scores below this calibration quantile: anomalies, up to
# 1 - TRIM_LEVEL of a day, score above it (bench/drift.py: 0-10 % injected anomalies)
TRIM_LEVEL = 0.9
CONFIDENCE_Z = 1.959963984540054  # the anomaly rate's 95 % interval


@dataclass
class DayStats:
    """Mergeable counts of one day's scored rows."""

    rows: int = 0
    flagged: int = 0
    below: list[int] = field(default_factory=list)  # per calibration quantile: scores <= it
    feature_counts: list[int] = field(default_factory=list)  # records naming each feature
    # the same among the records that were not flagged (statistics written before it: empty)
    unflagged_counts: list[int] = field(default_factory=list)
    # per segment with a baseline of its own (model/calibration/segments.py): its records'
    # counts, against its own quantiles
    segments: dict[str, DayStats] = field(default_factory=dict)

    @classmethod
    def empty(cls, quantiles: int, features: int) -> DayStats:
        return cls(0, 0, [0] * quantiles, [0] * features, [0] * features)

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
        unflagged = named[~flagged.astype(bool)].sum(axis=0)
        self.unflagged_counts = (
            np.asarray(self.unflagged_counts or [0] * len(counts), dtype=np.int64) + unflagged
        ).tolist()

    def merge(self, other: DayStats) -> DayStats:
        segments = dict(self.segments)
        for value, part in other.segments.items():
            segments[value] = segments[value].merge(part) if value in segments else part
        return DayStats(
            self.rows + other.rows,
            self.flagged + other.flagged,
            [a + b for a, b in zip(self.below, other.below, strict=True)],
            [a + b for a, b in zip(self.feature_counts, other.feature_counts, strict=True)],
            [a + b for a, b in zip(self.unflagged_counts, other.unflagged_counts, strict=True)],
            segments,
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DayStats:
        segments = {v: cls.from_json(part) for v, part in d.get("segments", {}).items()}
        return cls(**{**d, "segments": segments})


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
    # per segment with a baseline of its own: its reference (the records its baseline judges)
    segments: dict[str, Reference] = field(default_factory=dict)

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
        segments: dict | None = None,
    ):
        """`segments`: each segment's baseline (a Calibration) by value."""
        shares = calibration.top_feature_share
        own = {
            value: cls.of(
                baseline,
                features,
                threshold_quantile=threshold_quantile,
                k=k,
                model_k=model_k,
                flag_rule=flag_rule,
            )  # fmt: skip
            for value, baseline in (segments or {}).items()
        }
        return cls(
            segments=own,
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
        """The day against this reference; with segments, each segment's records against its
        own too, every test at alpha / (1 + segments) (Bonferroni: the chance of any false
        alarm stays within alpha). The day's alarm is the global test's or any segment's."""
        if self.not_comparable:
            return {"alarm": False, "assessed": False, "why": self.not_comparable}
        each = alpha / (1 + len(self.segments)) if self.segments else alpha
        result = assess(
            stats,
            list(self.levels),
            self.expected_rate,
            self.rows,
            list(self.features),
            None if self.shares is None else list(self.shares),
            each,
            budget=1.0 - self.threshold_quantile,
        )
        if not self.segments or not result["assessed"]:
            return result
        parts = {}
        for value, reference in self.segments.items():
            part = stats.segments.get(value)
            if part is None or part.rows == 0:
                continue
            found = reference.assess(part, each)
            parts[value] = {key: found[key] for key in ("alarm", "assessed", "reasons", "rows",
                                                         "anomaly_rate", "data_drift")
                            if key in found}  # fmt: skip
            result["reasons"] += [f"segment {value}: {r}" for r in found.get("reasons", [])]
        result["segments"] = parts
        result["alarm"] = bool(result["alarm"] or any(p["alarm"] for p in parts.values()))
        return result


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


def wilson(k: int, n: int, z: float = CONFIDENCE_Z) -> tuple[float, float]:
    """The Wilson score interval of a share k/n (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - half), min(1.0, centre + half)


def bulk_ks(
    below: np.ndarray, n: int, levels: np.ndarray, m: int, trim: float = TRIM_LEVEL
) -> tuple[float, float, int]:
    """(D, p, rows) of the two-sample KS test on the scores below the calibration's `trim`
    quantile, each sample conditioned on lying there: the day's CDF there is below/below_at_trim,
    the calibration's level/trim (`below`: the day's rows with a score at or under each
    calibration quantile, `levels` their levels)."""
    inside = levels <= trim + 1e-12
    cut = int(np.flatnonzero(inside)[-1])
    n_bulk = int(below[cut])
    m_bulk = int(round(m * levels[cut]))
    if n_bulk == 0 or m_bulk == 0:
        return 0.0, 1.0, n_bulk
    day = below[: cut + 1] / n_bulk
    calibration = levels[: cut + 1] / levels[cut]
    d = float(np.max(np.abs(day - calibration)))
    return d, kolmogorov_p(d, n_bulk, m_bulk), n_bulk


def assess(
    stats: DayStats,
    levels: list[float],
    expected_rate: float,
    calibration_rows: int,
    feature_names: list[str],
    calibration_shares: list[float] | None,
    alpha: float = ALPHA,
    budget: float | None = None,
) -> dict:
    """The drift section of a manifest: {"alarm": data drift, "reasons": [...], "data_drift":
    its test, "anomaly_rate": the notice, descriptions...}. `budget`: 1 - q, the share the
    threshold was set to flag (default: `expected_rate`)."""
    n, m = stats.rows, calibration_rows
    if n == 0 or m == 0:
        return {"alarm": False, "assessed": False, "why": "no scored rows to compare"}
    levels_arr = np.asarray(levels)
    below = np.asarray(stats.below, dtype=np.float64)
    day_cdf = below / n

    d_bulk, p_bulk, n_bulk = bulk_ks(below, n, levels_arr, m)
    unflagged = n - stats.flagged
    tested = calibration_shares is not None and len(stats.unflagged_counts) == len(feature_names)
    cut = alpha / (1 + (len(feature_names) if tested else 0))  # Bonferroni over the tests
    reasons = []
    if p_bulk < cut:
        reasons.append(
            f"the bulk of the scores moved (KS D = {d_bulk:.3f} on the {n_bulk:,} scores below "
            f"the calibration's {TRIM_LEVEL:.0%} quantile, p = {p_bulk:.1e})"
        )
    per_feature = []
    if tested and unflagged > 0:
        for name, count, share in zip(
            feature_names, stats.unflagged_counts, calibration_shares, strict=True
        ):
            zf, pf = two_proportion(count, unflagged, share, m)
            per_feature.append({"feature": name, "share": count / unflagged,
                                "calibration_share": share, "z": zf, "p_value": pf})  # fmt: skip
            if pf < cut:
                reasons.append(
                    f"{name} named by the top_features of {count / unflagged:.1%} of the records "
                    f"not flagged (calibration {share:.1%}, p = {pf:.1e})"
                )
    data_drift = {
        "alarm": bool(reasons),
        "p_value_threshold": cut,
        "features": per_feature,
        "bulk_scores": {
            "ks_statistic": d_bulk,
            "p_value": p_bulk,
            "trim_level": TRIM_LEVEL,
            "rows": n_bulk,
        },
    }

    z, p_rate = two_proportion(stats.flagged, n, expected_rate, m)
    low, high = wilson(stats.flagged, n)
    anomaly_rate = {
        "flagged": stats.flagged,
        "rate": stats.flagged / n,
        "interval": [low, high],
        "confidence": 0.95,
        "budget": expected_rate if budget is None else budget,
        "expected_rate": expected_rate,
        "z": z,
        "p_value": p_rate,
        "above_expected": bool(p_rate < alpha and z > 0),
    }

    d = float(np.max(np.abs(day_cdf - levels_arr)))
    deciles = np.linspace(0.0, 1.0, PSI_BINS + 1)
    day_at = np.interp(deciles, levels_arr, day_cdf)
    day_at[0], day_at[-1] = 0.0, 1.0  # below the smallest / above the largest quantile
    scores = {
        "ks_statistic": d,
        "p_value": kolmogorov_p(d, n, m),
        "psi_deciles": psi(np.diff(day_at), np.diff(deciles)),
    }
    features = []
    for name, count, share in zip(
        feature_names, stats.feature_counts, calibration_shares or (), strict=False
    ):
        features.append({"feature": name, "share": count / n, "calibration_share": share})
    return {
        "alarm": data_drift["alarm"],
        "assessed": True,
        "reasons": reasons,
        "rows": n,
        "calibration_rows": m,
        "alpha": alpha,
        "p_value_threshold": cut,
        "data_drift": data_drift,
        "anomaly_rate": anomaly_rate,
        "scores": scores,
        "features": features,
    }


def findings(drift: dict) -> dict:
    """A manifest's drift section as the two findings, for manifests written before the split
    too: {"assessed", "data_drift_alarm" (None when not assessed), "reasons", "anomaly_rate"
    (rate, interval, expected_rate, budget; None when not assessed)}. A manifest written before
    the split had one alarm over three tests (its flagged-rate test among them): its alarm and
    reasons are kept as they were, and its flagged share gets its interval here."""
    if not drift.get("assessed"):
        return {"assessed": False, "data_drift_alarm": None, "reasons": [],
                "anomaly_rate": None, "why": drift.get("why", "")}  # fmt: skip
    rate = drift.get("anomaly_rate")
    if rate is None:  # before the split
        flagged, n = drift["flagged"], drift["rows"]
        k = int(round(flagged["rate"] * n))
        rate = {
            "flagged": k,
            "rate": flagged["rate"],
            "interval": list(wilson(k, n)),
            "confidence": 0.95,
            "budget": flagged["expected_rate"],
            "expected_rate": flagged["expected_rate"],
            "z": flagged["z"],
            "p_value": flagged["p_value"],
            "above_expected": bool(flagged["p_value"] < drift["p_value_threshold"]
                                   and flagged["z"] > 0),
        }  # fmt: skip
    return {
        "assessed": True,
        "data_drift_alarm": bool(drift["alarm"]),
        "reasons": list(drift.get("reasons", [])),
        "anomaly_rate": rate,
    }


def above(rate: dict, limit: float) -> bool:
    """Whether a day's anomaly rate is above `limit` with its interval's lower end above it
    too (`--fail-on-anomaly-rate`)."""
    return rate["rate"] > limit and rate["interval"][0] > limit


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
