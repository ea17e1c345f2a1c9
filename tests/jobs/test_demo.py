"""The demo at its default settings: what it injects, flagged by the model's is_anomaly.

Training is on the first day, which itself holds 0.5 % injected anomalies (25 rows of each kind),
as a nightly user's last month would. Issue 15 asks every kind flagged at >= 90 % on the scored
days with normal rows at <= 1.5 % (the calibration flags 1 % of its normal rows at the 0.99
quantile; the training day's own anomalies among them are set aside). Impossible combinations
reached it only with the flag rule's conditional term, -log p(discrete | continuous): 85.3 % on a
fresh install without it, 95.7 % with it at the default seed, 97.7 % with the anomalies set aside
(bench/notes/, across data seeds too).
"""

import pytest

from vaewatch.jobs import demo

FLOORS = {
    "out_of_range": 0.9,
    "broken_correlation": 0.9,
    "impossible_combination": 0.9,  # 68 % on the total score alone, 85 % per feature
    "rare_category": 0.9,  # 24 % with the flag on the total score alone
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return demo.run(tmp_path_factory.mktemp("demo"), echo=lambda _: None)


def test_demo_flags_each_injected_kind(result):
    assert set(result.flagged) == {*FLOORS, "normal"}
    for kind, floor in FLOORS.items():
        assert result.flagged[kind] >= floor, (kind, result.flagged)
    assert result.flagged["normal"] <= 0.015, result.flagged


def test_demo_names_what_each_kind_changed(result):
    """A flagged record's first top feature is a column its kind changed. Out-of-range amounts
    were named 34 % of the time by -log p(x_j|z) alone (the amount drags z to where the other
    features look wrong); -log p(x_j | x_-j), which flagged records get, names them all."""
    for kind in FLOORS:
        assert result.named[kind] >= 0.95, (kind, result.named)


def test_demo_ranks_injected_rows_above_normal_ones(result):
    assert result.roc_auc > 0.975  # measured 0.986
    assert result.rows_scored == 3 * 20_000  # the shifted fourth day is left out


def test_only_the_shifted_day_raises_data_drift(result):
    """The three days holding 2 % anomalies (the training day 0.5 %) over a bulk drawn as in
    training: an anomaly rate above the calibration's, no data-drift alarm. The fourth, with
    every amount x1.6: a data-drift alarm."""
    from vaewatch.model.calibration.drift import findings
    from vaewatch.pipeline.commit import read_manifest

    days = sorted((result.report.parent / "scores").glob("dt=*"))
    found = [findings(read_manifest(str(day)).drift) for day in days]
    assert [f["data_drift_alarm"] for f in found] == [False, False, False, True], found
    assert all(f["anomaly_rate"]["above_expected"] for f in found[:3])
