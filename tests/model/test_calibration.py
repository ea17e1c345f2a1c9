"""Calibration: percentiles and thresholds against exact empirical quantities; top features."""

import numpy as np
import pytest

from vaewatch.model import defaults
from vaewatch.model.calibration.scores import (
    Calibration,
    _surprise,
    discrete_weight,
    exponential_tails,
    quantile_levels,
)
from vaewatch.model.errors import UserError
from vaewatch.model.estimation.attribution import top_indices
from vaewatch.model.estimation.explanations import record_basis, top_features


@pytest.fixture(scope="module")
def calibration():
    rng = np.random.default_rng(0)
    scores = rng.normal(10.0, 2.0, 20_000)
    nll = rng.gamma(2.0, 1.0, (20_000, 3))
    return scores, nll, Calibration.fit(scores, nll, threshold_quantile=0.99)


def test_score_quantile_is_the_empirical_quantile(calibration):
    scores, _, cal = calibration
    assert cal.score_quantile(0.99) == pytest.approx(np.quantile(scores, 0.99), abs=1e-12)
    assert cal.score_quantile(0.999) == pytest.approx(np.quantile(scores, 0.999), abs=1e-12)
    assert cal.score_quantile(0.9995) == pytest.approx(np.quantile(scores, 0.9995), abs=1e-12)
    # off-grid levels interpolate between neighbouring grid quantiles
    assert abs(cal.score_quantile(0.9805) - np.quantile(scores, 0.9805)) < 0.01
    assert np.mean(scores > cal.score_quantile(0.99)) == pytest.approx(0.01, abs=1e-4)


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


def test_plateau_and_interpolated_scores_in_one_batch():
    """The ties test's three scores mixed with scores between and outside the quantiles, in one
    call: each row gets what it gets alone (the plateau search runs on the tied rows only)."""
    cal = Calibration.fit(np.array([1.0] * 50 + [2.0] * 50), np.zeros((100, 1)))
    batch = np.array([2.0, 0.5, 1.0, 1.5, np.nan, 1.25, 1.0, 3.0])
    alone = np.array([cal.percentile(np.array([s]))[0] for s in batch])
    np.testing.assert_array_equal(cal.percentile(batch), alone)
    assert cal.percentile(batch)[[1, 2, 3, 7]].tolist() == pytest.approx([0.0, 24.7, 50.0, 100])


def test_surprise_by_hand():
    """The largest of (term - start) / scale over the total and each feature; NaN anywhere in a
    row makes its surprise NaN (as numpy's max), infinities count as such."""
    start, scale = np.array([1.0, 0.0, 2.0]), np.array([2.0, 0.5, 4.0])
    scores = np.array([5.0, 1.0, 1.0, 1.0, 0.0])
    nll = np.array([[0.5, 2.0], [1.0, 10.0], [np.inf, 0.0], [0.0, np.nan], [-1.0, -2.0]])
    expected = [2.0, 2.0, np.inf, np.nan, -0.5]  # (5-1)/2; (10-2)/4; inf; NaN; (0-1)/2
    np.testing.assert_array_equal(_surprise(scores, nll, start, scale), expected)
    assert _surprise(scores, np.zeros((5, 0)), start[:1], scale[:1]).tolist() == [
        2.0, 0.0, 0.0, 0.0, -0.5
    ]  # fmt: skip


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
    basis = record_basis(np.array([False, False, True]), None, None)  # not flagged, over budget
    result = top_features(nll - baseline, ["a", "b", "c"], n=2, basis=basis).to_pylist()
    unexplained = dict.fromkeys(
        ["direction", "observed", "expected", "low", "high", "probability", "likely"]
    )
    assert result[0] == [
        {"feature": "b", "contribution": 3.0, "basis": "not_flagged", **unexplained}
    ]  # a and c are at baseline
    assert result[1] == []  # nothing above baseline (e.g. everything missing)
    assert result[2] == [
        {"feature": "c", "contribution": 7.0, "basis": "over_budget", **unexplained},
        {"feature": "a", "contribution": 2.0, "basis": "over_budget", **unexplained},
    ]


# ----------------------------------------------------------------------------- the flag rule


@pytest.mark.parametrize("seed", range(4))
def test_top_features_order_is_the_stable_sort(seed):
    """The n largest excesses, largest first, ties by feature index: what a stable sort of
    (rows x features) gives, on tables with many ties, infinities and NaN, and n from 1 to
    more than the features."""
    rng = np.random.default_rng(seed)
    for features in [1, 3, 13, 40, 320]:
        nll = rng.integers(-3, 3, (200, features)).astype(float)  # many ties
        if seed % 2:
            nll = rng.normal(size=(200, features))
        nll[rng.random(nll.shape) < 0.01] = rng.choice([np.inf, -np.inf, np.nan])
        baseline = rng.normal(size=features)
        excess = nll - baseline[None, :]
        for n in [1, 3, 5, 9, 400]:
            top, values, keep = top_indices(nll, baseline, n)
            expected = np.argsort(-excess, axis=1, kind="stable")[:, : min(n, features)]
            np.testing.assert_array_equal(top, expected)
            np.testing.assert_array_equal(values, np.take_along_axis(excess, expected, axis=1))


def test_exponential_tails_by_hand():
    """Column 0 is 0..99: numpy's linear 0.9 quantile is 89.1; the values above it are 90..99,
    excesses 0.9..9.9, whose median is (4.9 + 5.9) / 2 = 5.4, so the scale is 5.4 / ln 2. A
    constant column has nothing above its start, and a column spread over a tenth of a nat has
    a scale below the floor: both get MIN_TAIL_SCALE."""
    terms = np.column_stack([np.arange(100.0), np.full(100, 3.0), np.arange(100.0) * 1e-3])
    start, scale = exponential_tails(terms)
    np.testing.assert_allclose(start, [89.1, 3.0, 0.0891], rtol=1e-12)
    np.testing.assert_allclose(scale[0], 5.4 / np.log(2.0), rtol=1e-12)
    assert scale[1] == scale[2] == defaults.MIN_TAIL_SCALE


def test_the_tail_scale_is_an_exponentials_and_ignores_a_few_huge_values():
    """Above any level an exponential's excess is the same exponential (memorylessness), so
    5 + Exp(scale 2) has tail scale 2; with 20,000 excesses the median's relative error is
    ~1 %, so 4 % is 4 sd. One percent of values at 1e6 (a contaminated calibration set) would
    make a mean excess ~1,000x too large; the median moves by ~10 %."""
    rng = np.random.default_rng(3)
    clean = 5.0 + rng.exponential(2.0, 200_000)
    assert exponential_tails(clean[:, None])[1][0] == pytest.approx(2.0, rel=0.04)
    dirty = np.concatenate([clean, np.full(2_000, 1e6)])
    assert exponential_tails(dirty[:, None])[1][0] == pytest.approx(2.0, rel=0.2)


@pytest.fixture(scope="module")
def sparse():
    """20 features whose costs are Gamma(2, 1) nats each; the total is their sum."""
    rng = np.random.default_rng(5)

    def draw(n):
        nll = rng.gamma(2.0, 1.0, (n, 20))
        return nll.sum(axis=1), nll

    scores, nll = draw(20_000)
    return draw, Calibration.fit(scores, nll, threshold_quantile=0.99)


def test_the_flag_keeps_its_rate_on_fresh_rows_of_the_same_law(sparse):
    """The threshold is the calibration rows' 0.99 quantile of the surprise, so new rows from
    the same law are flagged at 1 %: 20,000 rows, binomial sd 0.07 %, band 0.35 % (5 sd)."""
    draw, cal = sparse
    assert cal.flag_rule == "any" and len(cal.tail_start) == 21
    for q, rate in ((0.99, 0.01), (0.999, 0.001)):
        scores, nll = draw(20_000)
        band = 5 * np.sqrt(rate / 20_000)
        assert np.mean(cal.flags(scores, nll, q)) == pytest.approx(rate, abs=band)


def test_one_very_unlikely_feature_is_flagged_where_the_total_is_not(sparse):
    """19 features at their median and one at 20 nats: the total, 19 * 1.68 + 20 ~ 52, is below
    the total's 0.99 quantile (Gamma(40, 1): ~56), but 20 nats is ~13 tail scales above that
    feature's 0.9 quantile (3.9). A record at the total's threshold is flagged whatever its
    features; one just below it with typical features is not."""
    _, cal = sparse
    median = np.median(np.random.default_rng(6).gamma(2.0, 1.0, 100_000))
    nll = np.full((1, 20), median)
    nll[0, 7] = 20.0
    total = nll.sum(axis=1)
    assert total[0] < cal.score_quantile(0.99)
    assert cal.flags(total, nll).tolist() == [True]
    typical = np.full((2, 20), median)
    at = np.array([cal.threshold() + 1e-9, cal.threshold() - 1e-9])
    assert cal.flags(at, typical).tolist() == [True, False]
    assert cal.threshold() > cal.score_quantile(0.99)  # the total's share of the 1 % is less


def test_the_total_rule_and_older_models_flag_on_the_score_alone(sparse):
    draw, cal = sparse
    scores, nll = draw(5_000)
    total = Calibration.fit(scores, nll, flag_rule="total")
    older = {k: v for k, v in cal.to_json().items() if k not in {
        "flag_rule", "tail_start", "tail_scale", "surprise_quantiles"}}  # fmt: skip
    for model in (total, Calibration.from_json(older)):
        assert model.threshold() == model.score_quantile(0.99)
        np.testing.assert_array_equal(model.flags(scores, nll), scores > model.threshold())
    assert Calibration.from_json(cal.to_json()) == cal
    with pytest.raises(ValueError, match="flag_rule must be one of"):
        Calibration.fit(scores, nll, flag_rule="some")


def test_too_few_calibration_rows_for_a_tail_per_term_fall_back_to_the_total(sparse):
    draw, _ = sparse
    scores, nll = draw(defaults.MIN_TAIL_ROWS - 1)
    few = Calibration.fit(scores, nll)
    assert few.flag_rule == "total"
    np.testing.assert_array_equal(few.flags(scores, nll), scores > few.score_quantile(0.99))
    assert Calibration.fit(*draw(defaults.MIN_TAIL_ROWS)).flag_rule == "any"
    one = Calibration.fit(np.array([3.0]), np.zeros((1, 2)))  # a one-row validation split
    assert one.flags(np.array([2.0, 4.0]), np.zeros((2, 2))).tolist() == [False, True]


def test_the_threshold_set_out_of_fold_keeps_the_rate_on_a_small_calibration():
    """On 300 calibration rows, tails fitted on the rows themselves squeeze their surprises and
    new rows are flagged at 1.8 % (measured over these 40 draws); set on each row's surprise
    under the other folds' tails, 1.2 %. The mean over 40 draws has sd ~0.1 %."""
    rng = np.random.default_rng(11)

    def draw(n):
        nll = rng.gamma(2.0, 1.0, (n, 20))
        return nll.sum(axis=1), nll

    fresh = draw(50_000)
    rates = [Calibration.fit(*draw(300)).flags(*fresh).mean() for _ in range(40)]
    assert 0.008 < np.mean(rates) < 0.015


def test_the_rule_can_be_chosen_at_scoring_where_the_model_supports_it(sparse):
    draw, cal = sparse
    scores, nll = draw(5_000)
    np.testing.assert_array_equal(
        cal.flags(scores, nll, rule="total"), scores > cal.score_quantile(0.99)
    )
    assert cal.threshold(rule="total") == cal.score_quantile(0.99)
    assert cal.threshold(rule="any") == cal.threshold() > cal.score_quantile(0.99)
    # a model trained with the total rule has its tails too: "any" can be asked for
    as_total, as_any = (Calibration.fit(scores, nll, flag_rule=r) for r in ("total", "any"))
    fresh = draw(5_000)
    np.testing.assert_array_equal(as_total.flags(*fresh, rule="any"), as_any.flags(*fresh))
    assert as_total.flags(*fresh).tolist() != as_any.flags(*fresh).tolist()
    with pytest.raises(UserError, match="flag_rule must be one of any, total, got 'some'"):
        cal.check_rule("some")
    stripped = {k: v for k, v in cal.to_json().items() if k != "surprise_quantiles"}
    with pytest.raises(UserError, match="trained before that rule; use `flag_rule=total`"):
        Calibration.from_json(stripped).flags(scores, nll, rule="any")
    few = Calibration.fit(*draw(50))
    with pytest.raises(UserError, match="calibrated on 50 rows, fewer than the 200"):
        few.threshold(rule="any")


def _with_anomalies(draw, n, share, rng):
    """`draw`'s n rows, the first `share` of them anomalies: one feature 30 nats higher."""
    scores, nll = draw(n)
    m = int(round(share * n))
    nll[np.arange(m), rng.integers(0, nll.shape[1], m)] += 30.0
    scores[:m] += 30.0
    return scores, nll


def test_anomalies_among_the_calibration_rows_do_not_take_the_normal_rows_share(sparse):
    """Calibration rows are held-out training rows and hold its anomalies. 0.4 % of them with
    one feature 30 nats up (~20 tail scales: beyond the surprises' 1e-4 tail level, ~9) are
    set aside, so fresh normal rows are flagged at 1 %; counted among the 1 % (models trained
    before), 0.4 % of it went to them and normal rows got ~0.6 %. 20,000 fresh rows, binomial
    sd 0.07 %, bands 4 sd."""
    draw, _ = sparse
    rng = np.random.default_rng(21)
    cal = Calibration.fit(*_with_anomalies(draw, 20_000, 0.004, rng), threshold_quantile=0.99)
    assert cal.surprise_outliers == pytest.approx(0.004, abs=0.0005)
    fresh = draw(20_000)
    band = 4 * np.sqrt(0.01 / 20_000)
    assert np.mean(cal.flags(*fresh)) == pytest.approx(0.01, abs=band)
    older = Calibration.from_json(
        {k: v for k, v in cal.to_json().items() if k != "surprise_outliers"}
    )
    assert older.surprise_outliers == 0.0
    assert np.mean(older.flags(*fresh)) == pytest.approx(0.006, abs=band)
    # the share of the calibration rows flagged: 1 % of the normal ones and the anomalies
    assert cal.flagged_share() == pytest.approx(1 - 0.99 * (1 - cal.surprise_outliers))
    assert older.flagged_share() == cal.flagged_share(rule="total") == pytest.approx(0.01)


def test_at_most_half_of_the_flags_share_is_set_aside(sparse):
    """3 % anomalies: all of them are outliers, but only 0.5 x (1 - q) of the rows is set aside
    (a normal tail heavier than exponential would otherwise lose its flags' share): the
    threshold is the 0.99 x 0.995 quantile of all the calibration surprises, by hand from the
    stored quantiles, and at q = 0.999 the 0.999 x 0.9995 one."""
    draw, _ = sparse
    rng = np.random.default_rng(22)
    cal = Calibration.fit(*_with_anomalies(draw, 20_000, 0.03, rng), threshold_quantile=0.99)
    assert cal.surprise_outliers == pytest.approx(0.03, abs=0.001)
    for q in (0.99, 0.999):
        level = q * (1 - 0.5 * (1 - q))
        expected = np.interp(level, cal.levels, cal.surprise_quantiles)
        assert cal.set_aside(q) == pytest.approx(0.5 * (1 - q))
        assert cal.surprise_threshold(q) == pytest.approx(expected)
        assert cal.flagged_share(q) == pytest.approx(1 - level)


def test_a_clean_calibration_sets_nothing_aside(sparse):
    """Gamma costs have a lighter tail than the exponential its surprises are tested against:
    on 20,000 clean rows none is beyond its 1e-4 level (2 expected if the tail were exactly
    exponential)."""
    draw, _ = sparse
    assert Calibration.fit(*draw(20_000)).surprise_outliers <= 2 / 20_000


def test_discrete_weight_is_the_ratio_of_the_two_parts_spreads():
    """Hand-set parts: the rest of the score (-log p(x_c) and the missing costs) has median
    absolute deviation 10, -log p(x_d|x_c) has 1, so the discrete part counts 10 times; a
    near-constant part is held at MIN_TAIL_SCALE nats of spread; the weight is never below 1."""
    d = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    rest = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    assert discrete_weight(rest + d, d) == pytest.approx(10.0)
    assert discrete_weight(rest + 7.0, np.full(5, 7.0)) == pytest.approx(10.0 / 0.25)
    assert discrete_weight(np.full(5, 3.0) + d, d) == 1.0  # a more variable part: never < 1
    both = np.r_[rest + d, np.inf]  # a non-finite score does not enter the spreads
    assert discrete_weight(both, np.r_[d, 1.0]) == pytest.approx(10.0)


def test_a_calibration_with_both_kinds_scores_the_weighted_sum():
    """Calibration.fit with discrete_nll: its quantiles are those of -log p(x_c) + w * -log
    p(x_d|x_c) (w from the calibration rows' spreads), `complete` gives a new row that score,
    and refuses to without its discrete part; without both kinds the score stays -log p(x)."""
    rng = np.random.default_rng(3)
    n = 4_000
    cont = rng.normal(20.0, 3.0, n)  # -log p(x_c): MAD 3 * 0.6745
    disc = rng.exponential(1.0, n)  # -log p(x_d|x_c): MAD about 0.48
    nll = rng.gamma(2.0, 1.0, (n, 3))
    cal = Calibration.fit(cont + disc, nll, discrete_nll=disc)
    mad = lambda v: np.median(np.abs(v - np.median(v)))  # noqa: E731
    w = mad(cont) / mad(disc)
    assert cal.discrete_weight == pytest.approx(w) and 3.0 < w < 6.0
    assert cal.score_quantile(0.5) == pytest.approx(np.quantile(cont + w * disc, 0.5), rel=1e-3)
    ll = -(np.array([21.0, 19.0]) + np.array([0.1, 3.0]))  # log p(x) of two new rows
    missing = np.zeros((2, 3), dtype=bool)
    np.testing.assert_allclose(
        cal.complete(ll, missing, np.array([0.1, 3.0])), [21.0 + w * 0.1, 19.0 + w * 3.0]
    )
    with pytest.raises(ValueError, match="pass discrete_nll"):
        cal.complete(ll, missing)
    plain = Calibration.fit(cont + disc, nll)
    assert plain.discrete_weight == 1.0
    np.testing.assert_allclose(plain.complete(ll, missing), -ll)
    older = {k: v for k, v in cal.to_json().items() if k != "discrete_weight"}
    assert Calibration.from_json(older).discrete_weight == 1.0  # saved before the weight
