"""The demo at its default settings: what it injects, flagged by the model's stored threshold.

Training is on the first day, which itself holds 0.5 % injected anomalies (25 rows of each kind),
as a nightly user's last month would. The floors below are this model's measured rates minus a
margin (bench/RESULTS.md has the figures and why two kinds sit where they do); the normal rate
is the calibration's promise (1 % at the 0.99 quantile) plus room for sampling.
"""

import pytest

from vaewatch.jobs import demo

FLOORS = {
    "out_of_range": 0.95,
    "broken_correlation": 0.95,
    "impossible_combination": 0.55,  # measured 68 % (63 % before issue 15's changes)
    "rare_category": 0.15,  # measured 24 % (19 % before); the issue asks for 90 %: not met
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return demo.run(tmp_path_factory.mktemp("demo"), echo=lambda _: None)


def test_demo_flags_each_injected_kind(result):
    assert set(result.flagged) == {*FLOORS, "normal"}
    for kind, floor in FLOORS.items():
        assert result.flagged[kind] >= floor, (kind, result.flagged)
    assert result.flagged["normal"] <= 0.015, result.flagged


def test_demo_ranks_injected_rows_above_normal_ones(result):
    assert result.roc_auc > 0.975  # measured 0.986
    assert result.rows_scored == 3 * 20_000
