"""nightly, query, top, summary, models: on committed output only, counts exact."""

import datetime as dt
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.conftest import TRAIN_EXCLUDE, write_days
from vaewatch.jobs.cli import main
from vaewatch.jobs.nightly import parse_date
from vaewatch.model.errors import UserError
from vaewatch.pipeline.commit import output_lock, read_manifest


@pytest.fixture(scope="module")
def partitions(tmp_path_factory):
    root = tmp_path_factory.mktemp("partitions")
    for i, day in enumerate(("2026-03-01", "2026-03-02", "2026-03-03")):
        write_days(
            root / "in" / f"dt={day}", days=1, rows=1_000 + 100 * i, anomaly_rate=0.02, seed=i
        )
    return root


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _nightly(trained, root, *extra, out="out"):
    job, _ = trained
    return _invoke(
        "nightly", "--input-root", root / "in", "--output-root", root / out,
        "--model", "models:/transactions@champion", "--tracking-uri", job.tracking_uri, *extra,
    )  # fmt: skip


def test_two_days_a_rerun_and_a_backfill(trained, partitions):
    first = _nightly(trained, partitions, "--date", "2026-03-01")
    assert first.exit_code == 0, first.output
    second = _nightly(trained, partitions, "--date", "2026-03-02")
    assert second.exit_code == 0, second.output
    run_id = read_manifest(str(partitions / "out" / "dt=2026-03-01")).run_id

    again = _nightly(trained, partitions, "--date", "2026-03-01")  # same version: skipped
    assert again.exit_code == 0 and "skipped" in again.output
    assert read_manifest(str(partitions / "out" / "dt=2026-03-01")).run_id == run_id
    forced = _nightly(trained, partitions, "--date", "2026-03-01", "--force")  # replaced
    assert forced.exit_code == 0, forced.output
    assert read_manifest(str(partitions / "out" / "dt=2026-03-01")).run_id != run_id

    backfill = _nightly(trained, partitions, "--from", "2026-03-01", "--to", "2026-03-03")
    assert backfill.exit_code == 0, backfill.output
    assert backfill.output.count("skipped") == 2 and "2026-03-03: scored 1,200" in backfill.output

    counts = _invoke(
        "query", partitions / "out", "SELECT dt, count(*) AS n FROM scores GROUP BY dt ORDER BY dt",
        "--format", "json",
    )  # fmt: skip
    assert counts.exit_code == 0, counts.output
    got = json.loads(counts.output)  # one JSON document
    assert got == [
        {"dt": "2026-03-01", "n": 1000},
        {"dt": "2026-03-02", "n": 1100},
        {"dt": "2026-03-03", "n": 1200},
    ]


@pytest.fixture(scope="module")
def committed(trained, partitions):
    result = _nightly(trained, partitions, "--from", "2026-03-01", "--to", "2026-03-03", out="c")
    assert result.exit_code == 0, result.output
    return partitions / "c"


def test_query_top_summary_see_committed_output_only(committed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(committed, out)
    # a crashed, uncommitted partition and staging debris: both invisible
    crashed = out / "dt=2026-03-04"
    crashed.mkdir()
    pq.write_table(pq.read_table(out / "dt=2026-03-01"), crashed / "part-00000-of-00001.parquet")
    (out / ".dt=2026-03-05.staging-abc").mkdir()
    result = _invoke("query", out, "SELECT count(*) AS n FROM scores", "--format", "csv")
    assert result.exit_code == 0 and result.output.split() == ["n", "3300"], result.output

    summary = _invoke("summary", out, "--format", "jsonl")
    days = [json.loads(line) for line in summary.output.strip().splitlines()]
    assert [d["dt"] for d in days] == ["2026-03-01", "2026-03-02", "2026-03-03"]
    assert [d["rows"] for d in days] == [1000, 1100, 1200]
    assert all(0 < d["anomaly_rate"] < 0.2 and d["model_version"] == "transactions/1" for d in days)

    top = _invoke("top", out, "--date", "2026-03-02", "-n", "5", "--format", "json")
    rows = json.loads(top.output)
    assert len(rows) == 5 and {r["dt"] for r in rows} == {"2026-03-02"}
    scores = [r["anomaly_score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and rows[0]["top_features"]
    table = _invoke("top", out, "-n", "3")
    assert table.exit_code == 0 and "anomaly_score" in table.output and "+" in table.output
    # the crashed day is not committed: asking for it says so (it used to print an empty table)
    missing = _invoke("top", out, "--date", "2026-03-04")
    assert missing.exit_code == 1, missing.output
    assert (
        "no committed partition for 2026-03-04; committed days: 2026-03-01, 2026-03-02, "
        "2026-03-03" in missing.output
    )


def test_query_formats_are_valid_documents_and_honour_out(committed, tmp_path):
    sql = "SELECT * FROM (VALUES (1, 'NaN'::DOUBLE), (2, 'inf'::DOUBLE), (3, 0.5)) t(i, x)"
    as_json = _invoke("query", committed, sql, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == [
        {"i": 1, "x": None},
        {"i": 2, "x": None},
        {"i": 3, "x": 0.5},
    ]
    lines = _invoke("query", committed, sql, "--format", "jsonl").output.strip().splitlines()
    assert [json.loads(line)["i"] for line in lines] == [1, 2, 3]
    empty = "SELECT count(*) AS n FROM scores WHERE false GROUP BY dt"
    assert json.loads(_invoke("query", committed, empty, "--format", "json").output) == []
    assert _invoke("query", committed, empty, "--format", "jsonl").output.strip() == ""
    assert _invoke("query", committed, empty, "--format", "csv").output.split() == ["n"]
    for fmt in ("table", "csv", "json", "jsonl"):
        target = tmp_path / f"result.{fmt}"
        done = _invoke("query", committed, sql, "--format", fmt, "--out", target)
        assert done.exit_code == 0 and done.output.strip() == f"wrote {target}", done.output
        assert target.read_text().strip() and "1" in target.read_text()
    assert json.loads((tmp_path / "result.json").read_text())[2] == {"i": 3, "x": 0.5}


def test_paths_with_quotes_and_bad_sql(committed, tmp_path):
    odd = tmp_path / 'it\'s "odd"; --'
    shutil.copytree(committed / "dt=2026-03-01", odd / "dt=2026-03-01")
    result = _invoke("query", odd, "SELECT count(*) AS n FROM scores", "--format", "csv")
    assert result.exit_code == 0 and result.output.split() == ["n", "1000"], result.output
    bad = _invoke("query", odd, "SELEKT 1")
    assert bad.exit_code == 1 and "DuckDB rejected the query" in bad.output
    nothing = _invoke("query", tmp_path / "empty", "SELECT 1")
    assert nothing.exit_code == 1 and "no committed vaewatch output" in nothing.output
    parquet = _invoke(
        "query", odd, "SELECT * FROM scores", "--format", "parquet", "--out", tmp_path / "r.parquet"
    )
    assert parquet.exit_code == 0 and pq.read_table(tmp_path / "r.parquet").num_rows == 1000


def test_nightly_errors_are_exit_1(trained, partitions):
    missing = _nightly(trained, partitions, "--date", "2026-04-01")
    assert missing.exit_code == 1 and "dt=2026-04-01" in missing.output
    assert "Traceback" not in missing.output
    for bad in ("../../etc", "2026-02-30", "2026-3-1", "2026-03-01/x"):
        result = _nightly(trained, partitions, "--date", bad)
        assert result.exit_code == 1 and "--date" in result.output, bad
    mixed = _nightly(trained, partitions, "--from", "2026-03-01")
    assert mixed.exit_code == 1 and "both --from and --to" in mixed.output
    backwards = _nightly(trained, partitions, "--from", "2026-03-03", "--to", "2026-03-01")
    assert backwards.exit_code == 1 and "before" in backwards.output


def test_parse_date_and_default_is_yesterday(monkeypatch):
    from vaewatch.jobs import nightly

    assert parse_date("2026-03-01") == dt.date(2026, 3, 1)
    with pytest.raises(UserError):
        parse_date("2026-03-01T00:00")
    # 00:30 on 1 March in UTC+2 is 22:30 on 28 February in UTC: yesterday is 27 February
    plus_two = dt.timezone(dt.timedelta(hours=2))
    now = dt.datetime(2026, 3, 1, 0, 30, tzinfo=plus_two)
    assert nightly.days_to_score(None, None, None, now=now) == [dt.date(2026, 2, 27)]
    assert nightly.days_to_score(None, "2026-02-27", "2026-03-01") == [
        dt.date(2026, 2, 27),
        dt.date(2026, 2, 28),
        dt.date(2026, 3, 1),
    ]
    with pytest.raises(UserError, match="both --from and --to"):
        nightly.days_to_score("2026-03-01", "2026-02-27", None)
    # the command with no --date scores yesterday by the UTC clock
    seen = {}

    def fake_run(job, echo, on_planned=None):
        seen["days"] = job.days
        return []

    monkeypatch.setattr(nightly, "run_nightly", fake_run)
    before = dt.datetime.now(dt.timezone.utc).date()
    result = CliRunner().invoke(
        main, ["nightly", "--input-root", "a", "--output-root", "b", "--model", "m"]
    )
    after = dt.datetime.now(dt.timezone.utc).date()
    assert result.exit_code == 0, result.output
    assert seen["days"][0] in {before - dt.timedelta(days=1), after - dt.timedelta(days=1)}
    assert len(seen["days"]) == 1


def test_a_second_run_of_the_same_output_is_refused_while_one_runs(tmp_path):
    with output_lock(str(tmp_path / "out")):
        with pytest.raises(UserError, match="another vaewatch run is writing"):
            with output_lock(str(tmp_path / "out")):
                pass
    with output_lock(str(tmp_path / "out")):  # released after the first run
        pass


def test_models_list_and_promote(trained):
    job, outcome = trained
    listed = _invoke("models", "--tracking-uri", job.tracking_uri)
    assert listed.exit_code == 0, listed.output
    line = next(row for row in listed.output.splitlines() if row.startswith("transactions "))
    assert " champion " in line and outcome.artifact.metadata["data_fingerprint"]["digest"] in line
    # the registered weights' validation IWAE and epoch, not the last epoch's
    history, best = outcome.fitted.history, outcome.fitted.best_epoch
    # the best epoch and the number run are listed apart (the refit may end on its best)
    assert f" {history[best].val_iwae:.3f} " in line and f" {best} of {len(history)} " in line
    promoted = _invoke(
        "models", "--tracking-uri", job.tracking_uri, "promote", "transactions",
        outcome.resolved.version, "--alias", "staging",
    )  # fmt: skip
    assert promoted.exit_code == 0, promoted.output
    assert "champion,staging" in _invoke("models", "--tracking-uri", job.tracking_uri).output
    missing = _invoke("models", "--tracking-uri", job.tracking_uri, "promote", "transactions", "99")
    assert missing.exit_code == 1 and "vaewatch models" in missing.output


def test_report_embeds_valid_pngs_and_names_the_top_anomalies(committed, tmp_path):
    import base64
    import re

    result = _invoke("report", committed, "--out", tmp_path / "report.html", "-n", "10")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 4  # distribution, per day, latent projection, contributors
    for data in images:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # self-contained
    top = _invoke("top", committed, "--date", "2026-03-03", "-n", "3", "--format", "json")
    ids = [row["record_id"] for row in json.loads(top.output)]
    for record_id in ids:
        assert f"<td>{record_id}</td>" in page
    assert "Most anomalous records, 2026-03-03" in page


def test_report_over_days_scored_by_models_with_other_latent_sizes(
    committed, partitions, workspace, tmp_path
):
    """A retrained model with another latent size scores the next day: the report (which crashed
    stacking 8- and 2-wide latent means) plots the latest day's model's codes only and says so."""
    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig

    out = tmp_path / "out"
    shutil.copytree(committed, out)
    fitted = fit(
        str(workspace / "train"),
        FitConfig(
            id_column="record_id",
            exclude=TRAIN_EXCLUDE,
            latent_dim=2,
            train=TrainConfig(epochs=1, seed=0, device="cpu"),
        ),
    )
    model = fitted.artifact.save(tmp_path / "small-model")
    day = partitions / "in" / "dt=2026-03-03"
    scored = _invoke("score", "--input", day, "--output", out / "dt=2026-03-04", "--model", model)
    assert scored.exit_code == 0, scored.output
    widths = _invoke("query", out, "SELECT DISTINCT len(latent_mean) AS d FROM scores ORDER BY d")
    assert widths.output.split()[-2:] == ["2", "8"], widths.output
    result = _invoke("report", out, "--out", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    assert f"1,200 sampled records scored by {model}" in page


def test_changed_input_is_rescored_and_catch_up_fills_missed_days(trained, tmp_path):
    root = tmp_path
    days = [dt.date.today() - dt.timedelta(days=n) for n in (5, 4, 3)]  # all before yesterday
    for i, day in enumerate(days):
        write_days(root / "in" / f"dt={day}", days=1, rows=500 + 10 * i, anomaly_rate=0.02, seed=i)
    caught = _nightly(trained, root, "--catch-up")
    assert caught.exit_code == 0, caught.output
    assert [line.split(":")[0] for line in caught.output.splitlines() if ": scored" in line] == [
        str(d) for d in days
    ]  # the three missed days, oldest first
    again = _nightly(trained, root, "--catch-up")
    assert again.exit_code == 0 and again.output.count("skipped") == 3, again.output
    # a late correction of the middle day: its file gains rows after it was committed
    late = root / "in" / f"dt={days[1]}" / "part-0.parquet"
    table = pq.read_table(late)
    pq.write_table(pa.concat_tables([table, table.slice(0, 25)]), late)
    healed = _nightly(trained, root, "--date", str(days[1]))
    assert healed.exit_code == 0, healed.output
    assert "re-scoring: its input changed since it was committed (0 added, 0 removed, 1 " in (
        healed.output
    )
    assert read_manifest(str(root / "out" / f"dt={days[1]}")).rows.rows_in == 510 + 25
    bounded = _nightly(trained, root, "--catch-up", "--from", str(days[2]))
    assert bounded.exit_code == 0 and bounded.output.count("skipped") == 1, bounded.output
    clash = _nightly(trained, root, "--catch-up", "--date", str(days[0]))
    assert clash.exit_code == 1 and "--catch-up runs up to yesterday" in clash.output


def test_json_reports_match_what_was_committed(
    trained, workspace, partitions, tmp_path, monkeypatch
):
    job, _ = trained
    scored = _invoke(
        "score", "--input", partitions / "in" / "dt=2026-03-02", "--output", tmp_path / "s",
        "--model", "models:/transactions@champion", "--tracking-uri", job.tracking_uri, "--json",
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)  # stdout is the document; progress goes to stderr
    manifest = read_manifest(str(tmp_path / "s"))
    assert report["rows"] == manifest.rows.to_json() == {"in": 1100, "scored": 1100, "rejected": 0}
    assert report["run_id"] == manifest.run_id and report["model_uri"] == manifest.model.uri
    nightly = _nightly(trained, partitions, "--date", "2026-03-03", "--json", out="j")
    assert nightly.exit_code == 0, nightly.output
    [day] = json.loads(nightly.stdout)["days"]
    committed = read_manifest(str(partitions / "j" / "dt=2026-03-03"))
    assert (day["day"], day["status"]) == ("2026-03-03", "scored")
    assert day["rows"] == committed.rows.to_json() and day["rows"]["in"] == 1200
    # a folder of its own: train's default SQLite store and ./mlruns land there
    (tmp_path / "own").mkdir()
    monkeypatch.chdir(tmp_path / "own")
    trained_json = _invoke(
        "train", "--data", workspace / "train" / "part-0.parquet", "--model-name", "j",
        "--epochs", "1", "--exclude", ",".join(TRAIN_EXCLUDE), "--no-progress", "--json",
    )  # fmt: skip
    assert trained_json.exit_code == 0, trained_json.output
    model = json.loads(trained_json.stdout)
    assert model["model_uri"] == "models:/j/1" and model["rows"]["rows_read"] == 5_000
    # one epoch, inside the KL warm-up: no epoch was chosen, the only one's weights are kept
    assert (model["epochs"], model["best_epoch"], model["kept_epoch"]) == (1, None, 0)
    promoted = _invoke("models", "promote", "j", "1", "--alias", "staging", "--json")
    assert json.loads(promoted.stdout)["alias_uri"] == "models:/j@staging", promoted.output


def test_models_listing_reads_older_runs_from_the_epoch_history():
    """Runs logged before `best_val_iwae` / `epochs_run`: the kept epoch's value is looked up in
    the per-epoch history (hand-set), not the run's last `val_iwae`."""
    from types import SimpleNamespace

    from vaewatch.jobs.models import _kept_epoch

    steps = [SimpleNamespace(step=i, value=v) for i, v in enumerate([-9.0, -8.0, -7.5, -7.9])]
    client = SimpleNamespace(get_metric_history=lambda run_id, key: list(reversed(steps)))
    old = {"best_epoch": 2.0, "val_iwae": -7.9}
    assert _kept_epoch(client, "r", old) == (-7.5, "2 of 4")
    assert _kept_epoch(client, "r", {"best_epoch": -1.0, "val_iwae": -7.9}) == (-7.9, "3 of 4")
    new = {"best_epoch": 2.0, "val_iwae": -7.9, "best_val_iwae": -7.5, "epochs_run": 4.0}
    assert _kept_epoch(None, "r", new) == (-7.5, "2 of 4")
    assert _kept_epoch(None, "r", {"val_iwae": -7.9}) == (-7.9, None)  # no training metrics


def test_the_report_template_escapes_every_value():
    """Values reach the page through Jinja2's autoescaping: a hostile output path, feature
    name, reason or cell value is text, never markup."""
    from vaewatch.jobs.report import CAPTIONS, _template

    hostile = "<script>alert('x')</script>"
    page = _template().render(
        output=hostile, versions=[hostile], cards=[("model", hostile)],
        images={"distribution": "", "per_day": "", "latent": "", "contributors": ""},
        captions=CAPTIONS, latent_caption=hostile,
        drift=[{"day": "2026-01-01", "assessed": True, "alarm": True, "rate": 0.5,
                "interval": [0.45, 0.55], "budget": 0.01, "above_expected": True,
                "bulk_ks": 0.125, "ks": 0.25, "psi": 1.5, "reasons": [hostile]},
               {"day": hostile, "assessed": False, "why": hostile}],
        latest_day=hostile, top_columns=[hostile], top_rows=[[hostile]],
        segments=[{"baseline": hostile, "days": 2, "rows": 10, "anomalies": 1, "rate": 0.1,
                   "alarms": 1, "assessed": 2}],
    )  # fmt: skip
    assert "<script>" not in page
    assert page.count("&lt;script&gt;") >= 9
    assert "50.00% (45.00-55.00%) <b>above</b>" in page and 'class="alarm">ALARM' in page
    assert "<td>1.00%</td>" in page and "<td>0.125</td>" in page


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["score", "--help"],
        ["summary"],
        ["top", "-n", "3"],
        ["query", "SELECT count(*) FROM scores"],
        ["top", "--date", "2026-03-02"],
    ],  # fmt: skip
)
def test_reading_commands_start_without_torch_beam_or_mlflow(committed, args):
    """`--help` and the commands that read a local committed output load none of the scoring
    path's libraries (bench/startup.py measures what that saves)."""
    import subprocess
    import sys

    if args[0] in ("summary", "top", "query"):
        args = [args[0], str(committed), *args[1:]]
    probe = (
        "import sys\n"
        "from vaewatch.jobs.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    heavy = [m for m in ('torch', 'apache_beam', 'mlflow') if m in sys.modules]\n"
        "    print('LOADED', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stderr, done.stderr[-500:]
