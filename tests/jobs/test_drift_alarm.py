"""Drift through the whole job: days drawn like the training data do not alarm; a day whose
amounts are shifted does, is still committed, shows in summary, report and --json, and makes
`nightly --fail-on-drift` exit 3."""

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
from click.testing import CliRunner

from vaewatch.jobs.cli import main
from vaewatch.model.synthetic import transactions
from vaewatch.pipeline.commit import read_manifest

NORMAL_DAYS = ("2026-04-01", "2026-04-02", "2026-04-03")
SHIFTED_DAY = "2026-04-04"


def _write_day(root, day, seed, amount_factor=1.0):
    # drawn like the shared model's training days (conftest: anomaly rate 0.005)
    table = transactions(5_000, anomaly_rate=0.005, seed=seed)
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
        _write_day(inputs, day, seed=700 + i)
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
        assert drift["flagged"]["p_value"] > drift["p_value_threshold"]

    shifted = CliRunner().invoke(
        main, [*nightly, "--date", SHIFTED_DAY, "--fail-on-drift", "--json"]
    )
    assert shifted.exit_code == 3, shifted.output
    assert f"drift alarm on {SHIFTED_DAY}" in shifted.stderr
    report = json.loads(shifted.stdout)
    (day,) = report["days"]
    assert day["drift"]["alarm"] and day["drift"]["reasons"]
    committed = read_manifest(str(out / f"dt={SHIFTED_DAY}"))  # committed all the same
    assert committed.drift["alarm"] and committed.rows.rows_in == 5_000

    summary = CliRunner().invoke(main, ["summary", str(out), "--format", "json"])
    rows = {r["dt"]: r["drift"] for r in json.loads(summary.stdout)}
    assert rows == {**dict.fromkeys(NORMAL_DAYS, "ok"), SHIFTED_DAY: "ALARM"}
    runs = CliRunner().invoke(
        main, ["query", str(out), "SELECT count(*) AS n FROM runs WHERE drift_alarm", "--format",
               "csv"],
    )  # fmt: skip
    assert runs.stdout.splitlines() == ["n", "1"]

    page = tmp_path / "report.html"
    assert CliRunner().invoke(main, ["report", str(out), "--out", str(page)]).exit_code == 0
    assert "ALARM" in page.read_text() and "1 of 4 days" in page.read_text()
