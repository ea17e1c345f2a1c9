"""Calibration: where a score sits among the scores of held-out normal data.

(What a model saved before a field existed means by its absence is written, once, in
model/artifact.py's format upgrade.)

At training the validation split is scored with the production estimator (same K and seed as
scoring). We keep its anomaly-score quantiles on a fixed grid of levels (dense in the upper
tail, where thresholds live), a threshold at a chosen quantile, and each feature's median
-log p(x_j|z) and -log p(x_j|x_-j): `top_features`' baselines (model/estimation/attribution.py).

- `percentile(score)`: the empirical CDF of the calibration scores, linearly interpolated
  between grid points, in percent [0, 100]. Scores below the smallest calibration score are 0,
  above the largest 100.
- `score_quantile(q)`: the q-quantile of calibration scores (exact for grid levels,
  interpolated otherwise).
- `flags(scores, feature_nll, q)`: `is_anomaly`. The default rule ("any") flags a record when
  its total score *or any one feature's* -log p(x_j|z) is in its own upper tail, at one common
  tail level chosen so that a share 1 - q of the calibration rows' normal ones is flagged. Each
  term's tail above its TAIL_LEVEL quantile is summarised as exponential (peaks over threshold,
  with a robust scale: the median excess / ln 2), so a term's *surprise* is its excess over that
  quantile in units of its tail scale; a record's surprise is the largest of its terms', and the
  flag threshold is the q-quantile of the calibration rows' surprises, each computed with tails
  fitted on the other folds of the calibration rows (as a new row's is, on rows it is not part
  of), the rows whose surprise no exponential tail of the rest explains (the training set's own
  anomalies) set aside first, up to half of 1 - q (`set_aside`). A sparse anomaly (one value the
  model finds very unlikely, diluted in the total by every other feature's spread) is flagged.
  In a table with both continuous and discrete features one more term is tested the same way:
  -log p(x_d | x_c), the discrete values given the continuous ones (`discrete_nll`,
  model/estimation/estimators.py), which sees a combination that never occurs (an in-person
  purchase at an online-only merchant) where the record's own features' terms each look
  ordinary. The "total" rule (and any calibration on fewer than MIN_TAIL_ROWS rows, too few to
  fit a tail per term) flags `anomaly_score > score_quantile(q)`.
- `threshold(q)`: the anomaly score above which every record is flagged (under "any", the
  total's own cut; a record below it can still be flagged by one feature).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np

from vaewatch.model import defaults
from vaewatch.model._moved import deprecated_defaults
from vaewatch.model.choices import FlagRule
from vaewatch.model.errors import UserError, setting
from vaewatch.model.estimation.attribution import top_indices


def quantile_levels() -> np.ndarray:
    """0, 0.001, ..., 1 plus 0.9991..0.9999 and 0.99991..0.99999: 1019 levels, sorted."""
    base = np.linspace(0.0, 1.0, 1001)
    tail = np.concatenate([0.999 + np.arange(1, 10) * 1e-4, 0.9999 + np.arange(1, 10) * 1e-5])
    return np.unique(np.round(np.concatenate([base, tail]), 10))


@dataclass
class Calibration:
    levels: list[float]  # quantile levels in [0, 1], increasing
    quantiles: list[float]  # anomaly-score quantiles at those levels, non-decreasing (nats)
    threshold_quantile: float  # the level the default threshold sits at
    feature_baseline: list[float]  # median -log p(x_j|z) per feature on calibration rows (nats)
    rows: int  # calibration rows scored
    # per feature, the share of calibration rows whose top_features (the first
    # `top_feature_count`, as scored) name it: the drift check's reference
    top_feature_share: list[float] | None = None
    top_feature_count: int = defaults.TOP_FEATURES
    # True: anomaly_score = -log_likelihood + each missing feature's baseline (`complete`);
    # False: anomaly_score is -log_likelihood
    completes_missing: bool = False
    # the is_anomaly rule (module docstring)
    flag_rule: str = "total"
    # per term, the total score first and then each feature: where its exponential tail starts
    # (its TAIL_LEVEL quantile) and the tail's scale (nats); None when calibrated without them
    tail_start: list[float] | None = None
    tail_scale: list[float] | None = None
    surprise_quantiles: list[float] | None = None  # calibration rows' surprises at `levels`
    # the share of calibration rows whose surprise lies beyond the exponential tail of the
    # rest (`_surprise_outliers`), left out of the 1 - q the threshold flags (`set_aside`)
    surprise_outliers: float = 0.0
    # True: the tails' last term is -log p(x_discrete | x_continuous) (`discrete_nll`); False
    # in tables without both kinds
    conditional_term: bool = False
    # anomaly_score's weight on -log p(x_d | x_c) (`discrete_weight`); 1 in tables without both
    # kinds (the score is the plain surprisal)
    discrete_weight: float = 1.0
    # flagged records' top_features baseline, median -log p(x_j|x_-j)
    # (model/estimation/attribution.py)
    conditional_baseline: list[float] | None = None  # None: -log p(x_j|z) over feature_baseline

    @classmethod
    def fit(
        cls,
        anomaly_scores: np.ndarray,
        feature_nll: np.ndarray,
        threshold_quantile: float = defaults.THRESHOLD_QUANTILE,
        top_feature_count: int = defaults.TOP_FEATURES,
        missing: np.ndarray | None = None,
        flag_rule: str = defaults.FLAG_RULE,
        discrete_nll: np.ndarray | None = None,
    ) -> Calibration:
        """`anomaly_scores` are -log_likelihood; with `missing` ((n, F) bool, True where the
        value was missing) they are completed (`complete`) before their quantiles are taken.
        With `discrete_nll` ((n,), -log p(x_d|x_c)) the "any" rule tests it as one more term."""
        feature_nll = np.asarray(feature_nll, dtype=np.float64)
        baseline = np.median(feature_nll, axis=0)
        scores = np.asarray(anomaly_scores, dtype=np.float64)
        if missing is not None:
            scores = scores + _missing_cost(missing, baseline)
        weight = 1.0
        if discrete_nll is not None:
            weight = discrete_weight(scores, discrete_nll)
            scores = scores + (weight - 1.0) * np.asarray(discrete_nll, dtype=np.float64)
        finite = np.isfinite(scores)
        scores, terms = scores[finite], feature_nll[finite]
        if discrete_nll is not None:
            terms = np.column_stack([terms, np.asarray(discrete_nll, dtype=np.float64)[finite]])
        if scores.size == 0:
            raise ValueError("cannot calibrate on no finite scores")
        check_quantile(threshold_quantile)
        FlagRule.check("flag_rule", flag_rule)
        distribution = _distribution(scores, terms, flag_rule)
        top, _, keep = top_indices(feature_nll, baseline, top_feature_count)
        named = np.bincount(top[keep], minlength=feature_nll.shape[1])
        return cls(
            threshold_quantile=float(threshold_quantile),
            feature_baseline=baseline.tolist(),
            top_feature_share=(named / max(feature_nll.shape[0], 1)).tolist(),
            top_feature_count=int(top_feature_count),
            completes_missing=missing is not None,
            conditional_term=discrete_nll is not None and distribution["tail_start"] is not None,
            discrete_weight=weight,
            **distribution,
        )

    def for_rows(self, scores: np.ndarray, terms: np.ndarray) -> Calibration:
        """This calibration with the distribution of some of its rows: their anomaly scores
        (`complete`d, so on this calibration's scale) and terms (each feature's -log p(x_j|z),
        then -log p(x_d|x_c) where `conditional_term`), as `fit` takes them. The quantiles, the
        tails, the rows and the rule are theirs; the score's definition (baselines, weights) and
        the leave-one-out baseline stay this one's. A segment's baseline
        (model/calibration/segments.py)."""
        distribution = _distribution(
            np.asarray(scores, dtype=np.float64), np.asarray(terms, dtype=np.float64),
            self.flag_rule,
        )  # fmt: skip
        return replace(self, **distribution)

    def complete(
        self,
        log_likelihood: np.ndarray,
        missing: np.ndarray,
        discrete_nll: np.ndarray | None = None,
    ) -> np.ndarray:
        """The anomaly score: -log_likelihood, plus, for each missing value, what that feature
        typically costs when observed (its calibration median). log_likelihood is the density
        of what was observed (and of the observation pattern); a row missing a column would
        otherwise score lower than the same row with any typical value there, since the
        likelihood of fewer features is a sum over fewer terms. In a table with both kinds,
        -log p(x_d | x_c) counts `self.discrete_weight` times (the function `discrete_weight`
        says why); `discrete_nll` is required then. (B,) float64"""
        score = -np.asarray(log_likelihood, dtype=np.float64)
        if self.completes_missing:
            score = score + _missing_cost(missing, self.feature_baseline)
        if self.discrete_weight != 1.0:
            if discrete_nll is None:
                raise ValueError("this calibration weights -log p(x_d|x_c): pass discrete_nll")
            score = score + (self.discrete_weight - 1.0) * np.asarray(discrete_nll, np.float64)
        return score

    def score_quantile(self, quantile: float) -> float:
        """The `quantile` of the calibration rows' anomaly scores."""
        return float(np.interp(check_quantile(quantile), self.levels, self.quantiles))

    def level(self, quantile: float | None) -> float:
        """The quantile level a run flags at: `quantile`, checked, or the model's own."""
        return self.threshold_quantile if quantile is None else check_quantile(quantile)

    def threshold(self, quantile: float | None = None, rule: str | None = None) -> float:
        """The anomaly score above which every record is flagged at `quantile` (default: the
        model's) under `rule` (default: the model's): the total's own cut under "any", its
        quantile under "total"."""
        q = self.level(quantile)
        if self.check_rule(rule) == "total":
            return self.score_quantile(q)
        return self.tail_start[0] + self.tail_scale[0] * self.surprise_threshold(q)

    def surprise_threshold(self, quantile: float) -> float:
        """The `quantile` of the calibration rows' surprises ("any" rule only), the rows whose
        surprise no tail of the others explains left out (`set_aside`): all of them lie above
        it, so it is the q (1 - set_aside) quantile of every row's."""
        q = check_quantile(quantile)
        return float(np.interp(q * (1.0 - self.set_aside(q)), self.levels, self.surprise_quantiles))

    def set_aside(self, quantile: float) -> float:
        """The share of calibration rows left out of the 1 - q at `quantile`: their outliers
        (`surprise_outliers`), at most OUTLIER_SHARE of 1 - q. The outliers are the training
        set's own anomalies where the rows' tail is light, which would otherwise take part of
        the 1 - q; where it is heavy (single pixels tens of tail scales out on the digit tables)
        they are normal rows, and the bound keeps the normal rows flagged under
        (1 + OUTLIER_SHARE)(1 - q)."""
        return min(self.surprise_outliers, defaults.OUTLIER_SHARE * (1.0 - quantile))

    def flagged_share(self, quantile: float | None = None, rule: str | None = None) -> float:
        """The share of the calibration rows that `flags` flags at `quantile` under `rule`
        (defaults: the model's): 1 - q under "total"; under "any" 1 - q of the rows not set
        aside, and those. The drift check compares a day's flagged share with it."""
        q = self.level(quantile)
        if self.check_rule(rule) == "total":
            return 1.0 - q
        return 1.0 - q * (1.0 - self.set_aside(q))

    def surprise(
        self,
        anomaly_scores: np.ndarray,
        feature_nll: np.ndarray,
        discrete_nll: np.ndarray | None = None,
    ) -> np.ndarray:
        """(B,) float64: each record's largest tail excess over its terms ("any" rule only);
        `discrete_nll` is required where the model tests it (`conditional_term`)."""
        start, scale = np.asarray(self.tail_start), np.asarray(self.tail_scale)
        terms = np.asarray(feature_nll, dtype=np.float64)
        if self.conditional_term:
            if discrete_nll is None:
                raise ValueError("this calibration tests -log p(x_d|x_c): pass discrete_nll")
            terms = np.column_stack([terms, np.asarray(discrete_nll, dtype=np.float64)])
        return _surprise(anomaly_scores, terms, start, scale)

    def flags(
        self,
        anomaly_scores: np.ndarray,
        feature_nll: np.ndarray,
        quantile: float | None = None,
        rule: str | None = None,
        discrete_nll: np.ndarray | None = None,
    ) -> np.ndarray:
        """(B,) bool: `is_anomaly` at `quantile` under `rule` (defaults: the model's)."""
        q = self.level(quantile)
        scores = np.asarray(anomaly_scores, dtype=np.float64)
        if self.check_rule(rule) == "total":
            return scores > self.score_quantile(q)
        surprise = self.surprise(scores, feature_nll, discrete_nll)
        return surprise > self.surprise_threshold(q)

    @property
    def effective_rule(self) -> str:
        """The rule `flags` applies by default: "any" only where this calibration has tails."""
        return "any" if self.flag_rule == "any" and self.has_tails else "total"

    @property
    def has_tails(self) -> bool:
        """Whether the "any" rule can be applied: tails fitted on enough calibration rows."""
        return self.surprise_quantiles is not None and self.rows >= defaults.MIN_TAIL_ROWS

    def check_rule(self, rule: str | None) -> str:
        """`rule` (None: the model's own) if this calibration can apply it, else a UserError."""
        if rule is None:
            return self.effective_rule
        FlagRule.check("flag_rule", rule)
        if rule == "any" and not self.has_tails:
            why = (
                f"was calibrated on {self.rows} rows, fewer than the "
                f"{defaults.MIN_TAIL_ROWS} a tail per feature needs"
                if self.rows < defaults.MIN_TAIL_ROWS
                else "was trained before that rule"
            )
            raise UserError(
                f"flag rule 'any' needs per-feature tails and this model {why}; use "
                f"{setting('flag_rule', 'total')}, or retrain with more rows"
            )
        return rule

    def percentile(self, anomaly_scores: np.ndarray) -> np.ndarray:
        """(B,) float64 in [0, 100]. Flat stretches of the quantile curve (ties in the
        calibration scores) map to the middle of their levels."""
        q = np.asarray(self.quantiles)
        levels = np.asarray(self.levels)
        scores = np.asarray(anomaly_scores, dtype=np.float64)
        right = np.searchsorted(q, scores, side="right")
        lo = np.clip(right - 1, 0, len(q) - 1)
        hi = np.clip(right, 0, len(q) - 1)
        # the left insertion point differs from the right one only where a score equals a
        # calibration quantile (a plateau's level): searched for those rows alone
        left = right.copy()
        tied = np.flatnonzero(q[lo] == scores)
        left[tied] = np.searchsorted(q, scores[tied], side="left")
        # strictly between two distinct quantiles: interpolate; on a plateau: its mid level
        span = q[hi] - q[lo]
        frac = np.where(span > 0, (scores - q[lo]) / np.where(span > 0, span, 1.0), 0.0)
        interpolated = levels[lo] + frac * (levels[hi] - levels[lo])
        plateau = right > left
        mid = 0.5 * (
            levels[np.clip(left, 0, len(q) - 1)] + levels[np.clip(right - 1, 0, len(q) - 1)]
        )
        result = np.where(plateau, mid, interpolated)
        result = np.where(scores < q[0], 0.0, result)
        result = np.where(scores > q[-1], 1.0, result)
        result = np.where(np.isnan(scores), np.nan, result)
        return 100.0 * result

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(**d)


# the fields of a Calibration that describe its rows' score distribution (`_distribution`): what
# a segment's baseline holds of its own (model/calibration/segments.py)
DISTRIBUTION_FIELDS = ("levels", "quantiles", "rows", "flag_rule", "tail_start", "tail_scale",
                       "surprise_quantiles", "surprise_outliers")  # fmt: skip


def _distribution(scores: np.ndarray, terms: np.ndarray, flag_rule: str) -> dict:
    """The DISTRIBUTION_FIELDS of rows with finite `scores` (completed anomaly scores) and
    `terms` ((n, T), each term's -log p): quantiles on the fixed grid, and the per-term
    exponential tails and out-of-fold surprises where there are MIN_TAIL_ROWS rows (else the
    "total" rule)."""
    if scores.size == 0:
        raise ValueError("cannot calibrate on no finite scores")
    levels = quantile_levels()
    quantiles = np.maximum.accumulate(np.quantile(scores, levels))
    out = dict(levels=levels.tolist(), quantiles=quantiles.tolist(), rows=int(scores.size),
               flag_rule=flag_rule, tail_start=None, tail_scale=None, surprise_quantiles=None,
               surprise_outliers=0.0)  # fmt: skip
    if scores.size >= defaults.MIN_TAIL_ROWS:
        columns = np.column_stack([scores, terms])  # the total first, then each feature
        start, scale = exponential_tails(columns)
        surprise = _out_of_fold_surprise(columns)
        out.update(
            tail_start=start.tolist(),
            tail_scale=scale.tolist(),
            surprise_quantiles=np.maximum.accumulate(np.quantile(surprise, levels)).tolist(),
            surprise_outliers=_surprise_outliers(surprise),
        )
    else:
        out["flag_rule"] = "total"  # too few rows to fit a tail per term
    return out


def check_quantile(quantile: float) -> float:
    if not 0.0 < quantile < 1.0:
        raise UserError(f"threshold quantile must be in (0, 1), got {quantile}")
    return float(quantile)


def exponential_tails(
    terms: np.ndarray, floor: float = defaults.MIN_TAIL_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `terms` (n, T): (start, scale) of its upper tail seen as exponential: the
    TAIL_LEVEL quantile, and the median excess above it / ln 2 (the exponential's median is
    scale * ln 2; a median, not a mean, so the few anomalies a contaminated calibration holds
    do not stretch the tail), at least `floor` (nats for a term's costs)."""
    terms = np.asarray(terms, dtype=np.float64)
    start = np.quantile(terms, defaults.TAIL_LEVEL, axis=0)
    excess = np.where(terms > start, terms - start, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with nothing above its start
        median = np.nanmedian(excess, axis=0)
    scale = np.maximum(np.nan_to_num(median / math.log(2.0), nan=0.0), floor)
    return start, scale


def discrete_weight(scores: np.ndarray, discrete_nll: np.ndarray) -> float:
    """anomaly_score's weight on -log p(x_d | x_c): the spread (median absolute deviation, at
    least MIN_TAIL_SCALE nats) of the rest of the calibration rows' scores, -log p(x_c) and the
    missing values' costs, over its own, and at least 1. The parts are in different currencies,
    a density of the continuous values (nats per unit, summed over every continuous column) and
    a probability of the discrete ones, and the plain sum lets the first drown the second: on
    the demo an unseen merchant moved a record less than a typical amount does. Weighted, a
    record's score moves as much for being one typical spread out in either part. Never below
    1: a probability's nats are unit-free, and discounting them (titanic's sex and class, the
    more variable part there) cost up to 0.13 ROC-AUC (bench/notes/)."""
    d = np.asarray(discrete_nll, dtype=np.float64)
    rest = np.asarray(scores, dtype=np.float64) - d
    ok = np.isfinite(rest) & np.isfinite(d)
    if ok.sum() < 2:
        return 1.0
    mad = [np.median(np.abs(v[ok] - np.median(v[ok]))) for v in (rest, d)]
    return max(
        1.0, float(max(mad[0], defaults.MIN_TAIL_SCALE) / max(mad[1], defaults.MIN_TAIL_SCALE))
    )


def _out_of_fold_surprise(terms: np.ndarray) -> np.ndarray:
    """(n,) each calibration row's surprise under tails fitted on the other folds (TAIL_FOLDS,
    rows assigned by a fixed permutation). Tails fitted on a row itself squeeze its surprise, so
    a threshold from in-sample surprises flags new rows above 1 - q: 1.8-2.5 % at q = 0.99 on 200
    rows of light-, heavy-tailed and spiky synthetic terms (8 and 64 of them), 1.35-1.6 % on
    500, 1.0-1.2 % on 2,000; out of 10 folds, 1.1-1.65 %, 1.0-1.25 % and 0.94-1.1 %
    (bench/flag_calibration.py)."""
    n = terms.shape[0]
    fold = np.random.default_rng(0).permutation(n) % defaults.TAIL_FOLDS
    surprise = np.empty(n)
    for j in range(defaults.TAIL_FOLDS):
        held = fold == j
        start, scale = exponential_tails(terms[~held])
        surprise[held] = _surprise(terms[held, 0], terms[held, 1:], start, scale)
    return surprise


def _surprise_outliers(surprise: np.ndarray) -> float:
    """The share of calibration surprises beyond the OUTLIER_TAIL level of their upper tail seen
    as exponential (`exponential_tails` with no floor: a surprise is in tail scales). The
    median excess ignores the outliers, tens to thousands of tail scales out."""
    (start,), (scale,) = exponential_tails(surprise[:, None], floor=0.0)
    if scale <= 0.0:  # nothing above the start
        return 0.0
    cut = start + scale * math.log((1.0 - defaults.TAIL_LEVEL) / defaults.OUTLIER_TAIL)
    return float(np.mean(surprise > cut))


def _surprise(scores, feature_nll, start, scale) -> np.ndarray:
    """(B,) float64: max over terms (the total score, then each feature, then -log p(x_d|x_c)
    where tested) of (x - start) / scale."""
    surprise = (np.asarray(scores, dtype=np.float64) - start[0]) / scale[0]
    nll = np.asarray(feature_nll, dtype=np.float64)
    # a running maximum over the columns: numpy's max along the short last axis of (B, F) alone
    # took twice as long as this whole loop (11.4 vs 5.2 ms on 65,536 x 32), the largest numpy
    # cost of a K=1 job (bench/notes/); np.maximum propagates NaN as max does
    for j in range(nll.shape[1]):
        np.maximum(surprise, (nll[:, j] - start[j + 1]) / scale[j + 1], out=surprise)
    return surprise


def _missing_cost(missing, baseline) -> np.ndarray:
    """(B,) float64: the sum of the baselines of each row's missing features."""
    return np.asarray(missing, dtype=np.float64) @ np.asarray(baseline, dtype=np.float64)


# Names before 0.2.0 for defaults that live in vaewatch.model.defaults (until 0.3.0).
__getattr__ = deprecated_defaults(
    __name__,
    {
        "DEFAULT_THRESHOLD_QUANTILE": "THRESHOLD_QUANTILE",
        "DEFAULT_TOP_FEATURES": "TOP_FEATURES",
        "FLAG_RULES": "FLAG_RULES",
    },
)
