"""Calibration: percentiles and thresholds against exact empirical quantities; top features."""

import numpy as np
import pytest

from vaewatch.model.calibration import Calibration, quantile_levels, top_features
from vaewatch.model.errors import UserError


@pytest.fixture(scope="module")
def calibration():
    rng = np.random.default_rng(0)
    scores = rng.normal(10.0, 2.0, 20_000)
    nll = rng.gamma(2.0, 1.0, (20_000, 3))
    return scores, nll, Calibration.fit(scores, nll, threshold_quantile=0.99)


def test_threshold_is_the_empirical_quantile(calibration):
    scores, _, cal = calibration
    assert cal.threshold() == pytest.approx(np.quantile(scores, 0.99), abs=1e-12)
    assert cal.threshold(0.999) == pytest.approx(np.quantile(scores, 0.999), abs=1e-12)
    assert cal.threshold(0.9995) == pytest.approx(np.quantile(scores, 0.9995), abs=1e-12)
    # off-grid levels interpolate between neighbouring grid quantiles
    assert abs(cal.threshold(0.9805) - np.quantile(scores, 0.9805)) < 0.01
    assert np.mean(scores > cal.threshold()) == pytest.approx(0.01, abs=1e-4)


def test_percentile_is_the_empirical_cdf(calibration):
    scores, _, cal = calibration
    probes = np.quantile(scores, [0.001, 0.1, 0.5, 0.9, 0.99, 0.999])
    ecdf = np.array([np.mean(scores <= p) for p in probes]) * 100
    np.testing.assert_allclose(cal.percentile(probes), ecdf, atol=0.02)
    assert cal.percentile(np.array([-1e9, 1e9])).tolist() == [0.0, 100.0]
    assert np.isnan(cal.percentile(np.array([np.nan])))[0]
    grid = np.linspace(scores.min(), scores.max(), 1000)
    assert np.all(np.diff(cal.percentile(grid)) >= 0)  # monotone


def test_ties_map_to_the_middle_of_their_levels():
    """50 ones and 50 twos. numpy's linear quantile sits at position q * 99, so it is exactly
    1.0 for q <= 49/99 = 0.4949..: on the 0.001 grid, levels 0.000 .. 0.494. A score of 1.0 is
    that plateau, whose middle is (0 + 0.494) / 2 = 24.7 %. At q = 0.5 the position is 49.5,
    halfway between the last one and the first two: exactly 1.5, at level 0.5 alone (50 %)."""
    cal = Calibration.fit(np.array([1.0] * 50 + [2.0] * 50), np.zeros((100, 1)))
    assert cal.percentile(np.array([1.0]))[0] == pytest.approx(24.7, abs=1e-9)
    assert cal.percentile(np.array([1.5]))[0] == pytest.approx(50.0, abs=1e-9)
    assert cal.percentile(np.array([2.0]))[0] == pytest.approx(50 * (0.506 + 1.0), abs=1e-9)


def test_json_round_trip_and_levels(calibration):
    _, _, cal = calibration
    again = Calibration.from_json(cal.to_json())
    assert again == cal
    levels = quantile_levels()
    assert levels[0] == 0.0 and levels[-1] == 1.0 and np.all(np.diff(levels) > 0)
    assert {0.5, 0.99, 0.999, 0.9999}.issubset(set(levels.tolist()))


def test_bad_quantile_is_a_user_error(calibration):
    with pytest.raises(UserError, match="threshold quantile must be in"):
        calibration[2].threshold(1.5)


def test_top_features_by_hand():
    nll = np.array([[1.0, 5.0, 2.0], [0.0, 0.0, 0.0], [3.0, 2.5, 9.0]])
    baseline = np.array([1.0, 2.0, 2.0])
    result = top_features(nll, baseline, ["a", "b", "c"], n=2).to_pylist()
    assert result[0] == [{"feature": "b", "contribution": 3.0}]  # a and c are at baseline
    assert result[1] == []  # nothing above baseline (e.g. everything missing)
    assert result[2] == [
        {"feature": "c", "contribution": 7.0},
        {"feature": "a", "contribution": 2.0},
    ]
