"""Drift through the whole job, two findings apart: days drawn like the training data, one of
them holding 6 % anomalies, raise no data-drift alarm, and the anomalous day's rate is a notice
that `--fail-on-anomaly-rate` turns into exit 4; a day whose amounts are shifted raises a data
drift alarm, is still committed, shows in summary, report and --json, and makes
`nightly --fail-on-drift` exit 3. A day committed before the split reads as it was."""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from vaewatch.jobs.cli import main
from vaewatch.model.synthetic import transactions
from vaewatch.pipeline.commit import read_manifest

NORMAL_DAYS = ("2026-04-01", "2026-04-02", "2026-04-03")
ANOMALOUS_DAY = NORMAL_DAYS[1]  # 6 % injected anomalies over a bulk drawn as in training
SHIFTED_DAY = "2026-04-04"


def _write_day(root, day, seed, amount_factor=1.0, anomaly_rate=0.005):
    # drawn like the shared model's training days (conftest: anomaly rate 0.005)
    table = transactions(5_000, anomaly_rate=anomaly_rate, seed=seed)
    if amount_factor != 1.0:
        i = table.schema.get_field_index("amount")
        table = table.set_column(i, "amount", pc.multiply(table["amount"], amount_factor))
    folder = root / f"dt={day}"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")


def test_drift_alarms_only_on_the_shifted_day(trained, tmp_path):
    job, _ = trained
    inputs, out = tmp_path / "in", tmp_path / "out"
    for i, day in enumerate(NORMAL_DAYS):
        _write_day(inputs, day, seed=700 + i, anomaly_rate=0.06 if day == ANOMALOUS_DAY else 0.005)
    # x2.5: on this fixture's one model and 5,000-row day a x1.6 shift of the amounts gave
    # p = 5e-4, above the Bonferroni level; bench/drift.py (20,000-row days, 5 models) alarms
    # on every day at x1.6 and on 90 % at x1.3
    _write_day(inputs, SHIFTED_DAY, seed=710, amount_factor=2.5)
    nightly = [
        "nightly", "--input-root", str(inputs), "--output-root", str(out),
        "--model", "models:/transactions@champion", "--tracking-uri", job.tracking_uri,
    ]  # fmt: skip

    calm = CliRunner().invoke(
        main, [*nightly, "--from", NORMAL_DAYS[0], "--to", NORMAL_DAYS[-1], "--fail-on-drift"]
    )
    assert calm.exit_code == 0, calm.output
    for day in NORMAL_DAYS:
        drift = read_manifest(str(out / f"dt={day}")).drift
        assert drift["assessed"] and not drift["alarm"], (day, drift["reasons"])
        assert drift["anomaly_rate"]["above_expected"] == (day == ANOMALOUS_DAY), day
    assert f"anomaly rate on {ANOMALOUS_DAY}" in calm.stderr
    rate = read_manifest(str(out / f"dt={ANOMALOUS_DAY}")).drift["anomaly_rate"]
    low, high = rate["interval"]
    assert low < rate["rate"] < high and rate["budget"] == pytest.approx(0.01)

    # the same day with a limit on its anomaly rate: committed, then exit 4
    limited = CliRunner().invoke(
        main, [*nightly, "--date", ANOMALOUS_DAY, "--force", "--fail-on-anomaly-rate", "0.02"]
    )
    assert limited.exit_code == 4, limited.output
    assert "above --fail-on-anomaly-rate 2.00%" in limited.stderr
    loose = CliRunner().invoke(
        main, [*nightly, "--date", ANOMALOUS_DAY, "--force", "--fail-on-anomaly-rate", "0.5"]
    )
    assert loose.exit_code == 0, loose.output

    shifted = CliRunner().invoke(
        main, [*nightly, "--date", SHIFTED_DAY, "--fail-on-drift", "--json"]
    )
    assert shifted.exit_code == 3, shifted.output
    assert f"data drift on {SHIFTED_DAY}" in shifted.stderr
    report = json.loads(shifted.stdout)
    (day,) = report["days"]
    assert day["drift"]["alarm"] and day["drift"]["reasons"] and day["data_drift_alarm"]
    assert set(day["anomaly_rate"]) >= {"rate", "interval", "budget", "expected_rate"}
    committed = read_manifest(str(out / f"dt={SHIFTED_DAY}"))  # committed all the same
    assert committed.drift["alarm"] and committed.rows.rows_in == 5_000

    summary = CliRunner().invoke(main, ["summary", str(out), "--format", "json"])
    rows = {r["dt"]: r for r in json.loads(summary.stdout)}
    assert {d: r["data_drift"] for d, r in rows.items()} == {
        **dict.fromkeys(NORMAL_DAYS, "ok"),
        SHIFTED_DAY: "ALARM",
    }
    assert "budget 1.00%" in rows[ANOMALOUS_DAY]["rate_interval"]
    runs = CliRunner().invoke(
        main, ["query", str(out), "SELECT count(*) AS n FROM runs WHERE drift_alarm", "--format",
               "csv"],
    )  # fmt: skip
    assert runs.stdout.splitlines() == ["n", "1"]

    page = tmp_path / "report.html"
    assert CliRunner().invoke(main, ["report", str(out), "--out", str(page)]).exit_code == 0
    assert "ALARM" in page.read_text() and "1 of 4 days" in page.read_text()
    assert "<b>above</b>" in page.read_text()  # the anomalous day's rate

    # a day committed before the split: its one alarm (here the flagged rate's) reads as it was
    path = out / f"dt={NORMAL_DAYS[0]}" / "_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["drift"] = {
        "alarm": True, "assessed": True, "reasons": ["flagged rate 0.0270, expected 0.0119"],
        "rows": 5_000, "calibration_rows": 1_533, "alpha": 0.001, "p_value_threshold": 2e-4,
        "flagged": {"rate": 0.027, "expected_rate": 0.0119, "z": 4.2, "p_value": 2.7e-5},
        "scores": {"ks_statistic": 0.02, "p_value": 0.4, "psi_deciles": 0.004}, "features": [],
    }  # fmt: skip
    path.write_text(json.dumps(manifest))
    summary = CliRunner().invoke(main, ["summary", str(out), "--format", "json"])
    assert summary.exit_code == 0, summary.output
    old = {r["dt"]: r for r in json.loads(summary.stdout)}[NORMAL_DAYS[0]]
    assert old["data_drift"] == "ALARM" and "2.29-3.19% (budget 1.19%)" in old["rate_interval"]
    assert CliRunner().invoke(main, ["report", str(out), "--out", str(page)]).exit_code == 0
    assert "2 of 4 days" in page.read_text()

    # ... and its files as 0.2.0 wrote them, top_features without the explanation fields: they
    # read as null beside the days that have them, in query, top, summary and report
    for path in (out / f"dt={NORMAL_DAYS[0]}").glob("*.parquet"):
        table = pq.read_table(path)
        if "top_features" not in table.column_names:
            continue
        entries = table["top_features"].combine_chunks()
        flat = entries.flatten()
        fields = [flat.field("feature"), flat.field("contribution")]
        old_entries = pa.ListArray.from_arrays(
            entries.offsets, pa.StructArray.from_arrays(fields, ["feature", "contribution"]),
            mask=entries.is_null(),
        )  # fmt: skip
        where = table.schema.get_field_index("top_features")
        pq.write_table(table.set_column(where, "top_features", old_entries), path)
    sql = ("SELECT dt, count(*) FILTER (top_features[1].basis IS NULL) AS bare, "
           "count(*) FILTER (top_features[1].direction = 'above') AS above FROM scores "
           "WHERE len(top_features) > 0 GROUP BY dt ORDER BY dt")  # fmt: skip
    bare = CliRunner().invoke(main, ["query", str(out), sql, "--format", "json"])
    assert bare.exit_code == 0, bare.output
    counts = {r["dt"]: (r["bare"], r["above"]) for r in json.loads(bare.stdout)}
    assert counts[NORMAL_DAYS[0]][0] > 0 and counts[NORMAL_DAYS[0]][1] == 0
    assert counts[SHIFTED_DAY][0] == 0
    for command in (["top", str(out), "--date", NORMAL_DAYS[0]], ["summary", str(out)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["report", str(out), "--out", str(page)]).exit_code == 0
