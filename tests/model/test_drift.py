"""Drift statistics against independent references: scipy's distributions and two-sample KS,
brute-force counts, and simulated days where the truth (same distribution or shifted) is known."""

import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats as sps

from vaewatch.model.calibration.drift import (
    ALPHA,
    TRIM_LEVEL,
    DayStats,
    Reference,
    above,
    findings,
    kolmogorov_p,
    named_features,
    two_proportion,
    wilson,
)
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.contract import TOP_FEATURE_TYPE


def test_two_proportion_z_by_hand():
    # 30 of 1,000 flagged against 1 % estimated from 2,000 calibration records
    z, p = two_proportion(30, 1_000, 0.01, 2_000)
    pooled = (30 + 20) / 3_000  # 20 of the 2,000 calibration records
    expected = (0.03 - 0.01) / math.sqrt(pooled * (1 - pooled) * (1 / 1_000 + 1 / 2_000))
    assert z == pytest.approx(expected, rel=1e-12)
    assert p == pytest.approx(2 * sps.norm.sf(expected), rel=1e-9)


@pytest.mark.parametrize("d", [0.01, 0.03, 0.05, 0.1])
def test_kolmogorov_p_is_the_limit_law(d):
    n, m = 20_000, 1_500
    t = math.sqrt(n * m / (n + m)) * d
    assert kolmogorov_p(d, n, m) == pytest.approx(sps.kstwobign.sf(t), rel=1e-9, abs=1e-15)


def _reference(calibration: Calibration, names, k=4, model_k=4) -> Reference:
    return Reference.of(
        calibration,
        names,
        threshold_quantile=calibration.threshold_quantile,
        k=k,
        model_k=model_k,
    )


def _calibrate(scores, features=3, seed=0):
    rng = np.random.default_rng(seed)
    nll = rng.gamma(2.0, 1.0, size=(scores.size, features))
    return Calibration.fit(scores, nll, threshold_quantile=0.99, top_feature_count=2)


def _day(reference, scores, named):
    stats = reference.empty_stats()
    flagged = scores > np.interp(
        reference.threshold_quantile, reference.levels, reference.quantiles
    )
    stats.add(scores, flagged, np.asarray(reference.quantiles), named)
    return stats


def test_day_stats_count_and_merge():
    rng = np.random.default_rng(1)
    calibration = _calibrate(rng.normal(size=3_000))
    reference = _reference(calibration, ["a", "b", "c"])
    scores = rng.normal(size=1_000)
    scores[7] = np.nan  # not counted
    named = rng.random((1_000, 3)) < 0.3
    whole = _day(reference, scores, named)
    halves = _day(reference, scores[:400], named[:400]).merge(
        _day(reference, scores[400:], named[400:])
    )
    assert whole == halves
    ok = np.isfinite(scores)
    assert whole.rows == 999
    q = np.asarray(reference.quantiles)
    assert whole.below == [int(np.sum(scores[ok] <= x)) for x in q]
    assert whole.feature_counts == named[ok].sum(axis=0).tolist()
    assert DayStats.from_json(whole.to_json()) == whole


def test_ks_from_the_quantile_grid_matches_scipy():
    rng = np.random.default_rng(2)
    calibration_sample = rng.normal(size=4_000)
    calibration = _calibrate(calibration_sample)
    reference = _reference(calibration, ["a", "b", "c"])
    day = rng.normal(0.15, 1.0, size=20_000)
    result = reference.assess(_day(reference, day, np.zeros((day.size, 3), bool)))
    exact = sps.ks_2samp(day, calibration_sample).statistic
    d = result["scores"]["ks_statistic"]
    assert d <= exact + 1e-3  # read at the grid: a lower bound, up to the grid's resolution
    assert d == pytest.approx(exact, abs=5e-3)


def test_named_features_from_top_features():
    entries = [
        [{"feature": "b", "contribution": 1.0}, {"feature": "a", "contribution": 0.5}],
        [],
        None,
        [{"feature": "c", "contribution": 2.0}, {"feature": "zz", "contribution": 0.1}],
    ]
    named = named_features(pa.array(entries, type=TOP_FEATURE_TYPE), ["a", "b", "c"])
    assert named.tolist() == [
        [True, True, False],
        [False, False, False],
        [False, False, False],
        [False, False, True],
    ]


def test_calibration_top_feature_shares_by_hand():
    # feature 0 is above its median in rows 2, 3; feature 1 in rows 0, 3 (hand-set values)
    nll = np.array([[0.0, 5.0], [1.0, 1.0], [2.0, 0.0], [3.0, 2.0]])
    # medians: 1.5 and 1.5; excess row 0: (-1.5, 3.5) -> [1]; row 1: (-.5, -.5) -> [];
    # row 2: (.5, -1.5) -> [0]; row 3: (1.5, .5) -> [0, 1]
    calibration = Calibration.fit(np.arange(4.0), nll, top_feature_count=2)
    assert calibration.top_feature_share == [0.5, 0.5]
    one = Calibration.fit(np.arange(4.0), nll, top_feature_count=1)
    assert one.top_feature_share == [0.5, 0.25]  # row 3's first is feature 0 only


def _simulate(shift, days, rng, m=2_000, n=20_000):
    """Scores ~ Gamma(3) (+ shift on a day); a record names at most one feature, drawn with the
    calibration's shares."""
    calibration_scores = rng.gamma(3.0, size=m)
    nll = rng.gamma(2.0, 1.0, size=(m, 4))
    calibration = Calibration.fit(calibration_scores, nll, top_feature_count=1)
    reference = _reference(calibration, ["a", "b", "c", "d"])
    alarms = []
    for _ in range(days):
        scores = rng.gamma(3.0, size=n) + shift
        # the calibration's shares come from its own nll: use the same law for the day
        shares = np.asarray(calibration.top_feature_share)
        named = np.zeros((n, 4), bool)
        named[np.arange(n), rng.choice(4, size=n, p=shares / shares.sum())] = True
        keep = rng.random(n) < shares.sum()
        named &= keep[:, None]
        alarms.append(reference.assess(_day(reference, scores, named))["alarm"])
    return alarms


def test_same_distribution_days_do_not_alarm():
    """400 simulated days (20 calibration samples x 20 days): the family-wise rate is ALPHA by
    construction; allow a few, since days sharing a calibration sample are not independent."""
    rng = np.random.default_rng(3)
    alarms = [a for _ in range(20) for a in _simulate(0.0, 20, rng)]
    assert sum(alarms) <= 2, f"{sum(alarms)} false alarms in {len(alarms)} days"


def test_a_shifted_day_alarms():
    rng = np.random.default_rng(4)
    assert all(_simulate(0.5, 5, rng))  # a shift of 0.3 standard deviations


def test_scores_of_another_k_are_not_compared():
    rng = np.random.default_rng(5)
    calibration = _calibrate(rng.normal(size=500))
    reference = _reference(calibration, ["a", "b", "c"], k=64, model_k=4)
    result = reference.assess(reference.empty_stats())
    assert result == {"alarm": False, "assessed": False, "why": reference.not_comparable}
    assert "K=64" in result["why"] and ALPHA > 0


def test_a_feature_never_named_in_calibration_gives_finite_statistics():
    """Calibration share 0, named on the day: a finite z (pooled variance), an alarm, and a
    result that JSON without NaN or infinity can hold (it goes into the manifest)."""
    import json

    rng = np.random.default_rng(6)
    calibration = _calibrate(rng.normal(size=1_000))
    reference = _reference(calibration, ["a", "b", "c"])
    reference = Reference(**{**reference.__dict__, "shares": (0.0, 0.5, 0.5)})
    named = np.zeros((2_000, 3), bool)
    named[:100, 0] = True
    result = reference.assess(_day(reference, rng.normal(size=2_000), named))
    assert result["alarm"] and any(r.startswith("a named") for r in result["reasons"])
    assert result["data_drift"]["features"][0]["calibration_share"] == 0.0
    json.dumps(result, allow_nan=False)
    assert two_proportion(0, 500, 0.0, 1_000) == (0.0, 1.0)


def test_the_flagged_rate_is_compared_with_the_calibration_rows_own():
    """Under "any" the calibration rows it flags are 1 - q of the normal ones plus those set
    aside as anomalies (Calibration.set_aside), which is what a day like them is flagged at:
    1 - 0.99 x (1 - 0.004) here, by hand; under "total" exactly 1 - q."""
    rng = np.random.default_rng(4)
    nll = rng.gamma(2.0, 1.0, size=(20_000, 20))
    nll[np.arange(80), rng.integers(0, 20, 80)] += 30.0  # 0.4 %: beyond the surprises' tail
    calibration = Calibration.fit(nll.sum(axis=1), nll, threshold_quantile=0.99)
    assert calibration.surprise_outliers == pytest.approx(0.004, abs=0.0005)
    names = [f"f{j}" for j in range(20)]
    expected = 1 - 0.99 * (1 - calibration.surprise_outliers)
    assert _reference(calibration, names).expected_rate == pytest.approx(expected)
    total = Reference.of(
        calibration, names, threshold_quantile=0.99, k=4, model_k=4, flag_rule="total"
    )
    assert total.expected_rate == pytest.approx(0.01)
    stats = DayStats.empty(len(calibration.quantiles), 20)
    stats.rows, stats.flagged = 20_000, round(20_000 * expected)
    result = _reference(calibration, names).assess(stats)
    assert result["anomaly_rate"]["expected_rate"] == pytest.approx(expected)
    assert result["anomaly_rate"]["budget"] == pytest.approx(0.01)
    assert result["anomaly_rate"]["z"] == pytest.approx(0.0, abs=0.05)


def test_wilson_interval_by_hand():
    """10 of 100 at 95 %: 0.0552-0.1744 (the textbook value); 0 of 50: from 0 to 3.84/53.84."""
    low, high = wilson(10, 100)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)
    assert wilson(0, 50) == pytest.approx((0.0, 1.959964**2 / (50 + 1.959964**2)))


def test_the_bulk_test_is_the_ks_of_the_scores_below_the_trim_point():
    """The day's and the calibration's scores below the calibration's TRIM_LEVEL quantile,
    compared as samples of their own by scipy, give the statistic the grid gives (to the grid's
    resolution), also when 8 % of the day's records are anomalies scoring far above."""
    rng = np.random.default_rng(7)
    calibration_sample = rng.gamma(3.0, size=4_000)
    calibration = _calibrate(calibration_sample)
    reference = _reference(calibration, ["a", "b", "c"])
    day = np.concatenate([rng.gamma(3.0, size=18_400) * 1.04, 40 + rng.gamma(3.0, size=1_600)])
    result = reference.assess(_day(reference, day, np.zeros((day.size, 3), bool)))
    cut = np.interp(TRIM_LEVEL, calibration.levels, calibration.quantiles)
    exact = sps.ks_2samp(day[day <= cut], calibration_sample[calibration_sample <= cut])
    bulk = result["data_drift"]["bulk_scores"]
    assert bulk["ks_statistic"] == pytest.approx(exact.statistic, abs=5e-3)
    assert bulk["rows"] == int(np.sum(day <= cut))


def _anomalous_days(share: float, days: int, rng, m=2_000, n=20_000):
    """Days whose bulk is drawn as the calibration's, plus `share` of records scoring far above
    it (and naming feature "a"): the findings of each."""
    calibration = Calibration.fit(
        rng.gamma(3.0, size=m), rng.gamma(2.0, 1.0, size=(m, 4)), top_feature_count=1
    )
    reference = _reference(calibration, ["a", "b", "c", "d"])
    shares = np.asarray(calibration.top_feature_share)
    out = []
    for _ in range(days):
        bad = rng.random(n) < share
        scores = np.where(bad, 30 + rng.gamma(3.0, size=n), rng.gamma(3.0, size=n))
        named = np.zeros((n, 4), bool)
        named[np.arange(n), rng.choice(4, size=n, p=shares / shares.sum())] = True
        named &= (rng.random(n) < shares.sum())[:, None]
        named[bad] = [True, False, False, False]
        out.append(reference.assess(_day(reference, scores, named)))
    return out


def test_more_anomalies_is_an_anomaly_rate_not_data_drift():
    """Days holding 2-10 % anomalies over an unchanged bulk: no data-drift alarm (the old single
    alarm fired on every one of them through the flagged rate and the named feature's share),
    and an anomaly rate above the calibration's flagged share, with an interval around it."""
    rng = np.random.default_rng(8)
    for share in (0.02, 0.05, 0.10):
        for result in _anomalous_days(share, 4, rng):
            assert not result["alarm"], (share, result["reasons"])
            rate = result["anomaly_rate"]
            assert rate["above_expected"] and rate["interval"][0] < rate["rate"]
            assert rate["interval"][0] <= share + 0.01 <= rate["interval"][1] + 0.01


def test_findings_read_a_manifest_written_before_the_split():
    """One alarm over three tests (the flagged rate among them), kept as it was; the flagged
    share gets its interval."""
    old = {
        "alarm": True, "assessed": True, "reasons": ["flagged rate 0.0270, expected 0.0119"],
        "rows": 5_000, "calibration_rows": 1_533, "alpha": 0.001, "p_value_threshold": 2e-4,
        "flagged": {"rate": 0.027, "expected_rate": 0.0119, "z": 4.2, "p_value": 2.7e-5},
        "scores": {"ks_statistic": 0.02, "p_value": 0.4, "psi_deciles": 0.004}, "features": [],
    }  # fmt: skip
    found = findings(old)
    assert found["data_drift_alarm"] is True and found["reasons"] == old["reasons"]
    rate = found["anomaly_rate"]
    assert rate["flagged"] == 135 and rate["interval"] == pytest.approx(list(wilson(135, 5_000)))
    assert rate["above_expected"] and rate["budget"] == 0.0119
    assert findings({"assessed": False, "why": "K"})["data_drift_alarm"] is None
    assert above(rate, 0.02) and not above(rate, 0.0235)  # the interval's lower end: 0.0229
