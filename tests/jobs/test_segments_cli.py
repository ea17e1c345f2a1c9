"""Baselines per segment through the commands a user runs: `train --segment-column` (a column
that is not a categorical feature is exit 1, named as the option), `nightly` writing the
`baseline` column and each segment's drift into the manifest, `summary --by-segment` and the
report's table by segment; outputs without segments read as before."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from vaewatch.jobs.cli import main
from vaewatch.model import registry
from vaewatch.model.synthetic import segmented
from vaewatch.pipeline.commit import read_manifest

pytestmark = pytest.mark.slow
DAYS = ("2026-05-01", "2026-05-02")  # the second: kiosk readings spread 1.6x wider


def _day(root, day, seed, kiosk_spread=1.0):
    table = segmented(6000, seed=seed)
    if kiosk_spread != 1.0:
        kiosk = np.asarray(table["store"].to_pylist()) == "kiosk"
        for j in range(4):
            values = table[f"r{j}"].to_numpy().copy()
            values[kiosk] = 10.0 + (values[kiosk] - 10.0) * kiosk_spread
            table = table.set_column(table.schema.get_field_index(f"r{j}"), f"r{j}",
                                     pa.array(values))  # fmt: skip
    (root / f"dt={day}").mkdir(parents=True)
    pq.write_table(table, root / f"dt={day}" / "part-0.parquet")


def test_segments_from_train_to_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(segmented(12_000, seed=1), tmp_path / "train.parquet")
    tracking = registry.default_tracking_uri(tmp_path)
    train = ["train", "--data", str(tmp_path / "train.parquet"), "--model-name", "stores",
             "--tracking-uri", tracking, "--id-column", "record_id",
             "--exclude", "is_injected_anomaly", "--epochs", "4", "--validation-fraction", "0.25",
             "--no-progress"]  # fmt: skip

    wrong = CliRunner().invoke(main, [*train, "--segment-column", "r0"])
    assert wrong.exit_code == 1, wrong.output
    assert "--segment-column r0" in wrong.stderr and "must be categorical" in wrong.stderr

    done = CliRunner().invoke(main, [*train, "--segment-column", "store"])
    assert done.exit_code == 0, done.output
    assert "segments of 'store': 2 with a baseline of their own" in done.stderr
    assert "outlet (" in done.stderr  # too few validation rows: judged by the global baseline

    inputs, out = tmp_path / "in", tmp_path / "out"
    _day(inputs, DAYS[0], seed=20)
    _day(inputs, DAYS[1], seed=21, kiosk_spread=1.6)
    nightly = CliRunner().invoke(main, [
        "nightly", "--input-root", str(inputs), "--output-root", str(out), "--model",
        "models:/stores@champion", "--tracking-uri", tracking, "--from", DAYS[0], "--to", DAYS[1],
        "--no-progress",
    ])  # fmt: skip
    assert nightly.exit_code == 0, nightly.output
    calm, shifted = (read_manifest(str(out / f"dt={d}")).drift for d in DAYS)
    assert set(calm["segments"]) == {"kiosk", "market"}
    assert not calm["alarm"] and shifted["alarm"]
    assert shifted["segments"]["kiosk"]["alarm"] and not shifted["segments"]["market"]["alarm"]
    labels = set(pq.read_table(out / f"dt={DAYS[0]}").column("baseline").to_pylist())
    assert labels == {"segment=kiosk", "segment=market", "global:small_segment"}

    by_segment = CliRunner().invoke(main, ["summary", str(out), "--by-segment", "--format",
                                           "json"])  # fmt: skip
    assert by_segment.exit_code == 0, by_segment.output
    rows = {(r["dt"], r["baseline"]): r for r in json.loads(by_segment.stdout)}
    assert rows[(DAYS[1], "segment=kiosk")]["data_drift"] == "ALARM"
    assert rows[(DAYS[1], "segment=market")]["data_drift"] == "ok"
    assert rows[(DAYS[0], "global:small_segment")]["data_drift"] == "-"
    assert sum(r["rows"] for r in rows.values()) == 12_000

    page = tmp_path / "report.html"
    assert CliRunner().invoke(main, ["report", str(out), "--out", str(page)]).exit_code == 0
    html = page.read_text()
    assert "By segment" in html and "segment=kiosk" in html and "1 of 2 days" in html
