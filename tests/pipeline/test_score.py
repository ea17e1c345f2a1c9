"""The Beam scoring pipeline: exact scores, invariance, rejected rows, schema errors, layouts."""

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from vaewatch.jobs.cli import main
from vaewatch.model import defaults
from vaewatch.model.contract import SCORE_COLUMNS, Manifest, score_schema
from vaewatch.model.device import resolve_precision
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.scoring import Scorer
from vaewatch.pipeline.commit import MANIFEST, SUCCESS
from vaewatch.pipeline.drift import STATS_FILE
from vaewatch.pipeline.score import ScoreJob, ScoreOptions, run


def _job(trained, tmp_path, source, name="out", **overrides):
    job, _ = trained
    return ScoreJob(
        input=str(source),
        output=str(tmp_path / name),
        model="models:/transactions@champion",
        tracking_uri=job.tracking_uri,
        options=ScoreOptions(**overrides),
    )


def _scores(output) -> pa.Table:
    return ds.dataset(str(output), format="parquet").to_table().sort_by("record_id")


def _score_cli(trained, source, output):
    """`vaewatch score` through the CLI, as a user runs it."""
    job, _ = trained
    return CliRunner().invoke(
        main,
        ["score", "--input", str(source), "--output", str(output),
         "--model", "models:/transactions@champion", "--tracking-uri", job.tracking_uri],
    )  # fmt: skip


@pytest.fixture(scope="module")
def default_run(trained, workspace, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default-run")
    result = run(_job(trained, tmp, workspace / "holdout"))
    return result, tmp / "out"


def test_scores_equal_the_direct_estimator(trained, workspace, default_run):
    _, outcome = trained
    result, out = default_run
    table = pq.read_table(workspace / "holdout")
    scored = _scores(out)
    assert scored.num_rows == table.num_rows == result.manifest.rows.rows_in
    artifact = outcome.artifact
    enc = artifact.spec.encode(table)
    direct = score_records(
        artifact.build("cpu"),
        enc.x,
        enc.mask,
        log_std=artifact.spec.continuous_log_std,
        k=artifact.scoring.k,
        matmul_dtype=resolve_precision(defaults.PRECISION, torch.device("cpu")),
        proposal_scale=artifact.scoring.proposal_scale,
    )
    np.testing.assert_allclose(
        scored["log_likelihood"].to_numpy(), direct.log_likelihood.numpy(), rtol=1e-12, atol=0
    )
    np.testing.assert_allclose(scored["elbo"].to_numpy(), direct.elbo.numpy(), rtol=1e-12, atol=0)
    se = scored["log_likelihood_se"].to_numpy()
    np.testing.assert_allclose(se, direct.log_likelihood_se.numpy(), rtol=1e-12, atol=0)
    assert (se > 0).all() and (
        scored["elbo"].to_numpy() <= scored["log_likelihood"].to_numpy()
    ).all()
    latent = np.stack(scored["latent_mean"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(latent, direct.latent_mean.numpy(), rtol=1e-6)
    native = Scorer(artifact, model_version="transactions/1", device="cpu").score(table)
    assert scored["is_anomaly"].to_pylist() == native.scores["is_anomaly"].to_pylist()
    assert scored["top_features"].to_pylist() == native.scores["top_features"].to_pylist()
    np.testing.assert_allclose(
        scored["score_percentile"].to_numpy(), native.scores["score_percentile"].to_numpy()
    )


def test_output_follows_the_contract(trained, default_run):
    _, outcome = trained
    result, out = default_run
    files = {p.name for p in out.iterdir()}
    parts = {f for f in files if f.startswith("part-") and f.endswith(".parquet")}
    assert files - parts == {MANIFEST, SUCCESS, "_rejected"} and parts
    parquet = pq.ParquetFile(out / result.manifest.files[0])
    expected = pa.schema([pa.field("record_id", pa.int64()), *score_schema(8)])
    assert parquet.schema_arrow.equals(expected, check_metadata=False)
    assert parquet.metadata.row_group(0).column(1).compression == "ZSTD"
    meta = {k.decode(): v.decode() for k, v in parquet.schema_arrow.metadata.items()}
    assert meta["vaewatch.model_uri"] == outcome.resolved.uri
    assert meta["vaewatch.model_requested"] == "models:/transactions@champion"
    # the K the model chose at training (model/estimation/proposal.py choose_k)
    chosen = outcome.artifact.scoring.k
    assert chosen in defaults.K_LADDER
    assert (meta["vaewatch.k"], meta["vaewatch.seed"]) == (str(chosen), "0")
    assert "vaewatch.samples" not in meta
    assert meta["vaewatch.flag_rule"] == "any"
    assert meta["vaewatch.version"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["flag_rule"] == "any"
    # the JSON itself is the contract: plain keys a reader in any language can follow
    assert manifest["model"]["version"] == outcome.resolved.version
    assert manifest["rows"] == {"in": 5000, "scored": 5000, "rejected": 0}
    assert manifest["inputs"][0]["size"] > 0 and manifest["runner"] == "local"
    assert manifest["started"] <= manifest["finished"]
    assert manifest["files"] == list(result.manifest.files) == [f.name for f in out.glob("part-*")]
    assert Manifest.from_json(manifest) == result.manifest
    assert set(SCORE_COLUMNS) <= set(parquet.schema_arrow.names)
    assert (out / SUCCESS).read_text().strip() == manifest["run_id"]


def test_with_no_column_kept_every_row_is_scored(trained, workspace, tmp_path, default_run):
    """A model trained without --id-column (or an input without its id column) keeps nothing
    but the scores. That run used to lose every row (Arrow gives a column-less table 0 rows
    after a take) and stop at the row-count check, committing nothing."""
    result = run(_job(trained, tmp_path, workspace / "holdout", keep=[]))
    assert result.manifest.rows.to_json() == {"in": 5000, "scored": 5000, "rejected": 0}
    scores = ds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert scores.schema.equals(pa.schema(score_schema(8)), check_metadata=False)
    reference = _scores(default_run[1])  # the same rows, in the same order per file
    assert sorted(scores["anomaly_score"].to_pylist()) == sorted(
        reference["anomaly_score"].to_pylist()
    )


def test_an_output_inside_its_input_is_refused_before_any_work(trained, workspace, tmp_path):
    """The second run over the folder would read the first run's scores as records (it used to
    fail then, naming a missing feature and suggesting a retrain)."""
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(next((workspace / "holdout").glob("*.parquet")), source / "part-0.parquet")
    result = _score_cli(trained, source, source / "scores")
    assert result.exit_code == 1, result.output
    assert f"output '{source / 'scores'}' is inside the input '{source}'" in result.output
    assert sorted(p.name for p in source.iterdir()) == ["part-0.parquet"]
    result = _score_cli(trained, source, source / "_scores")  # hidden from listings: allowed
    assert result.exit_code == 0, result.output


def test_batch_size_and_worker_processes_do_not_change_scores(
    trained, workspace, default_run, tmp_path
):
    _, out = default_run
    reference = _scores(out)
    small = _scores(
        run(_job(trained, tmp_path, workspace / "holdout", "small", batch_size=1_000)).output
    )
    parallel = _scores(
        run(_job(trained, tmp_path, workspace / "holdout", "mp", workers=2, shards=3)).output
    )
    for other in (small, parallel):
        assert other["record_id"].to_pylist() == reference["record_id"].to_pylist()
        np.testing.assert_allclose(
            other["log_likelihood"].to_numpy(), reference["log_likelihood"].to_numpy(), rtol=1e-12
        )
        assert other["is_anomaly"].to_pylist() == reference["is_anomaly"].to_pylist()
    assert len(list((tmp_path / "mp").glob("part-*.parquet"))) == 3


def test_rejected_rows_are_counted_and_explained(trained, workspace, tmp_path):
    table = pq.read_table(workspace / "holdout").slice(0, 10)
    amount = table.column("amount").to_pylist()
    amount[0] = float("inf")  # ±inf: cannot be scored
    amount[1] = float("-inf")
    amount[2] = float("nan")  # NaN: missing, marginalised, scored
    amount[3] = None  # null: the same
    amount[6] = 1e308  # a sentinel far beyond float32: rejected, not a NaN score
    amount[7] = 1e9  # absurd but representable: scored, and very anomalous
    table = table.set_column(table.schema.get_field_index("amount"), "amount", pa.array(amount))
    features = [f.name for f in trained[1].artifact.spec.features]
    for name in features:  # row 4: every feature null
        values = table.column(name).to_pylist()
        values[4] = None
        column = pa.array(values, table.schema.field(name).type)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    category = table.column("merchant_category").to_pylist()
    category[5] = "never-seen-before"  # unseen category: the out-of-vocabulary bucket, scored
    table = table.set_column(
        table.schema.get_field_index("merchant_category"),
        "merchant_category",
        pa.array(category).dictionary_encode(),
    )
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(table, source / "bad.parquet")
    result = run(_job(trained, tmp_path, source))
    rows = result.manifest.rows.to_json()
    assert rows == {"in": 10, "scored": 6, "rejected": 4}
    rejected = ds.dataset(str(tmp_path / "out" / "_rejected"), format="parquet").to_table()
    got = dict(zip(rejected["record_id"].to_pylist(), rejected["reason"].to_pylist(), strict=True))
    ids = table["record_id"].to_pylist()
    assert got == {
        ids[0]: "non_finite_value",
        ids[1]: "non_finite_value",
        ids[4]: "all_features_missing",
        ids[6]: "value_out_of_range",
    }
    assert rejected["amount"].to_pylist()[:1] in ([float("inf")], [float("-inf")], [None])
    scored = _scores(tmp_path / "out")
    assert sorted(scored["record_id"].to_pylist()) == sorted(ids[i] for i in (2, 3, 5, 7, 8, 9))
    absurd = scored.filter(pa.compute.equal(scored["record_id"], ids[7]))
    assert absurd["is_anomaly"][0].as_py() and absurd["anomaly_score"][0].as_py() > 1e3
    oov = scored.filter(pa.compute.equal(scored["record_id"], ids[5]))
    assert oov["top_features"][0].as_py()[0]["feature"] == "merchant_category"

    # the same rows queried: `vaewatch query`'s view `rejected`, over two days whose rejected
    # files have different columns (the second keeps one more), aligned by name
    from vaewatch.jobs.query import connect

    root = tmp_path / "days"
    run(_job(trained, root, source, name="dt=2026-01-01"))
    run(_job(trained, root, source, name="dt=2026-01-02", keep=["record_id", "anomaly_kind"]))
    con = connect(str(root))
    counts = con.sql(
        "SELECT CAST(dt AS VARCHAR), reason, count(*), count(anomaly_kind) FROM rejected "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert counts == [
        (day, reason, n, n if day.endswith("02") else 0)
        for day in ("2026-01-01", "2026-01-02")
        for reason, n in (("all_features_missing", 1), ("non_finite_value", 2),
                          ("value_out_of_range", 1))
    ]  # fmt: skip
    # the scored rows too: the two days' columns differ (a positional union refused them)
    assert con.sql("SELECT count(*), count(anomaly_kind) FROM scores").fetchall() == [(12, 6)]
    assert connect(str(tmp_path / "out")).execute("SELECT count(*) FROM rejected").fetchall() == [
        (4,)
    ]


def test_a_day_with_every_row_rejected_commits_and_reports_no_drift(trained, workspace, tmp_path):
    """No scored rows: the run still commits (every row in the rejected output), the manifest's
    drift section says there was nothing to compare rather than raising an alarm, and the day's
    statistics file does not stay behind in the output."""
    table = pq.read_table(workspace / "holdout").slice(0, 5)
    amount = pa.array([float("inf")] * 5, table.schema.field("amount").type)
    table = table.set_column(table.schema.get_field_index("amount"), "amount", amount)
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(table, source / "all-bad.parquet")
    result = run(_job(trained, tmp_path, source))
    assert result.manifest.rows.to_json() == {"in": 5, "scored": 0, "rejected": 5}
    assert result.manifest.drift == {
        "alarm": False,
        "assessed": False,
        "why": "no scored rows to compare",
    }
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert STATS_FILE not in left, left


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.drop_columns(["amount"]),
            "model feature 'amount' (expected continuous) is missing",
        ),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("amount"), "amount", pa.array(["x"] * t.num_rows)
            ),
            "model feature 'amount' expects a continuous column but the input has type string",
        ),
    ],
)
def test_schema_errors_exit_1_and_commit_nothing(trained, workspace, tmp_path, change, message):
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pq.read_table(workspace / "holdout").slice(0, 100), source / "a.parquet")
    pq.write_table(
        change(pq.read_table(workspace / "holdout").slice(100, 100)), source / "b.parquet"
    )
    result = _score_cli(trained, source, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert message in result.output and "b.parquet" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.staging-*"))


def test_missing_model_and_foreign_output_are_clear_errors(trained, workspace, tmp_path):
    job, _ = trained
    base = ["score", "--input", str(workspace / "holdout"), "--tracking-uri", job.tracking_uri]
    result = CliRunner().invoke(
        main, [*base, "--output", str(tmp_path / "o"), "--model", "models:/nope@champion"]
    )
    assert (
        result.exit_code == 1 and "not found" in result.output and "vaewatch train" in result.output
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.csv").write_text("keep me")
    result = CliRunner().invoke(
        main, [*base, "--output", str(foreign), "--model", "models:/transactions@champion"]
    )
    assert result.exit_code == 1 and "vaewatch did not write" in result.output
    assert (foreign / "precious.csv").read_text() == "keep me"


def test_empty_file_many_small_files_and_many_row_groups(trained, workspace, tmp_path):
    table = pq.read_table(workspace / "holdout")
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(table.slice(0, 0), source / "empty.parquet")
    for i in range(30):
        pq.write_table(table.slice(i * 7, 7), source / f"small-{i:02d}.parquet")
    pq.write_table(table.slice(1000, 3000), source / "groups.parquet", row_group_size=50)
    assert pq.ParquetFile(source / "groups.parquet").num_row_groups == 60
    result = run(_job(trained, tmp_path, source))
    assert result.manifest.rows.to_json() == {"in": 3210, "scored": 3210, "rejected": 0}
    scored = _scores(tmp_path / "out")
    expected = sorted(
        table.slice(0, 210)["record_id"].to_pylist()
        + table.slice(1000, 3000)["record_id"].to_pylist()
    )
    assert scored["record_id"].to_pylist() == expected
    assert len(result.manifest.inputs) == 32

    only_empty = tmp_path / "only-empty"
    only_empty.mkdir()
    pq.write_table(table.slice(0, 0), only_empty / "empty.parquet")
    result = run(_job(trained, tmp_path, only_empty, "out-empty"))
    assert result.manifest.rows.to_json() == {"in": 0, "scored": 0, "rejected": 0}
    assert ds.dataset(str(tmp_path / "out-empty"), format="parquet").count_rows() == 0


def test_runner_options_and_pass_through():
    from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from vaewatch.pipeline.score import pipeline_options

    job = ScoreJob(
        input="x", output="y", model="m", tracking_uri="t", options=ScoreOptions(workers=3)
    )
    options, runner = pipeline_options(job)
    assert isinstance(runner, FnApiRunner)  # in-process: never fetches the Prism binary
    direct = options.view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (3, "multi_processing")
    job = ScoreJob(
        input="x",
        output="y",
        model="m",
        tracking_uri="t",
        options=ScoreOptions(
            runner="DataflowRunner", beam_args=["--project", "p", "--region", "europe-west4"]
        ),
    )
    options, runner = pipeline_options(job)
    assert runner is None and options.get_all_options()["runner"] == "DataflowRunner"
    assert options.view_as(GoogleCloudOptions).region == "europe-west4"


def test_cli_passes_arguments_after_double_dash_to_beam(monkeypatch):
    import vaewatch.pipeline.score as score_module

    seen = {}

    def fake_run(job, **_):
        seen["job"] = job
        raise score_module.UserError("stop here")

    monkeypatch.setattr(score_module, "run", fake_run)
    result = CliRunner().invoke(
        main,
        ["score", "--input", "i", "--output", "o", "--model", "models:/m@a", "--runner",
         "FlinkRunner", "--", "--flink_master", "host:8081", "--parallelism", "4"],
    )  # fmt: skip
    assert result.exit_code == 1 and "stop here" in result.output
    assert seen["job"].options.runner == "FlinkRunner"
    assert seen["job"].options.beam_args == ("--flink_master", "host:8081", "--parallelism", "4")


def test_files_with_other_numeric_widths_score_like_the_originals(trained, workspace, tmp_path):
    """A later file with float32/int32 columns (a common drift) is scored, not rejected; the
    scores match those of the same rows in their original types."""
    table = pq.read_table(workspace / "holdout").slice(0, 300)
    narrow = table.cast(
        pa.schema(
            [
                pa.field(f.name, pa.int32())
                if f.name in ("n_items", "record_id")
                else pa.field(f.name, pa.float32())
                if f.name == "hour"
                else f
                for f in table.schema
            ]
        )
    )
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(table.slice(0, 150), source / "a.parquet")
    pq.write_table(narrow.slice(150, 150), source / "b.parquet")
    result = run(_job(trained, tmp_path, source))
    assert result.manifest.rows.to_json() == {"in": 300, "scored": 300, "rejected": 0}
    reference = run(_job(trained, tmp_path, workspace / "holdout", "reference"))
    assert reference.manifest.rows.scored == 5000
    got = _scores(tmp_path / "out")
    want = _scores(tmp_path / "reference").slice(0, 300)
    assert got["record_id"].to_pylist() == want["record_id"].to_pylist()
    # hour lost precision in float32, so only rows 0-149 are bit-comparable
    np.testing.assert_allclose(
        got["log_likelihood"].to_numpy()[:150], want["log_likelihood"].to_numpy()[:150], rtol=1e-12
    )
    np.testing.assert_allclose(
        got["log_likelihood"].to_numpy()[150:], want["log_likelihood"].to_numpy()[150:], rtol=1e-4
    )


def test_a_file_that_is_not_parquet_is_a_clear_exit_1(trained, workspace, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "a-not-parquet.parquet").write_text("hello")  # sorts first
    pq.write_table(pq.read_table(workspace / "holdout").slice(0, 10), source / "b.parquet")
    result = _score_cli(trained, source, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "a-not-parquet.parquet" in result.output and "not readable Parquet" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_file_corrupt_past_its_footer_is_a_clear_exit_1(trained, workspace, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pq.read_table(workspace / "holdout").slice(0, 2000), source / "a.parquet")
    data = (workspace / "holdout" / "part-0.parquet").read_bytes()
    (source / "b.parquet").write_bytes(data[:4] + b"\0" * 1000 + data[1004:])  # pages zeroed
    result = _score_cli(trained, source, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "b.parquet" in result.output and "cannot be read past its footer" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.staging-*"))


def test_progress_lines_and_beam_counters(trained, workspace, tmp_path, caplog):
    """Each worker logs rows read / scored / rejected / rows per second as it goes, and the
    run's Beam counters (what a runner's UI shows) add up to the manifest."""

    caplog.set_level(logging.INFO, logger="vaewatch.progress")
    result = run(_job(trained, tmp_path, workspace / "holdout", batch_size=500, progress_seconds=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "vaewatch.progress"]
    progress = [line for line in lines if line.startswith("progress: ")]
    assert len(progress) >= 5 and "rows/s" in progress[-1], lines  # one per 500-row batch
    assert any(line.startswith("done: 5,000 rows read, 5,000 scored, 0 rejected") for line in lines)
    assert any(line.startswith("read ") and "5,000 rows" in line for line in lines)
    # one line per finished input file: its rows, scored, rejected, rows/s
    finished = [line for line in lines if line.startswith("finished ")]
    assert len(finished) == 1 and "part-0.parquet (row groups 0-2): 5,000 rows" in finished[0]
    assert "5,000 scored, 0 rejected" in finished[0] and "rows/s" in finished[0]
    counters = result.counters
    assert counters["rows_in"] == result.manifest.rows.rows_in == 5_000
    assert counters["rows_scored"] == result.manifest.rows.scored


def test_a_caller_in_the_launching_process_follows_the_rows_as_they_are_scored(
    trained, workspace, tmp_path
):
    """The local runner's one worker scores in this process: `progress.listening` hears every
    batch (500 rows each), and `on_planned` gives the plan, with the input rows from the
    footers, before any is read: what the CLI's progress bar is drawn from."""
    from vaewatch.pipeline import progress

    planned, heard = [], []
    with progress.listening(heard.append):
        result = run(
            _job(trained, tmp_path, workspace / "holdout", batch_size=500),
            on_planned=lambda plan: planned.append((plan.manifest.rows.rows_in, len(heard))),
        )
    assert planned == [(5_000, 0)]
    assert heard == [500] * 10 and result.manifest.rows.rows_in == sum(heard)
    assert progress._listeners == []


def test_score_draws_its_bar_from_the_plan_and_only_when_asked(trained, workspace, tmp_path):
    """--progress draws a bar labelled with the output (on a terminal it redraws; under a test
    runner click writes its label); --no-progress and the default off a terminal draw none."""
    job, _ = trained
    args = ["score", "--input", str(workspace / "holdout"), "--model",
            "models:/transactions@champion", "--tracking-uri", job.tracking_uri]  # fmt: skip
    shown = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "a"), "--progress"])
    assert shown.exit_code == 0, shown.output
    assert "scoring a" in shown.stderr
    for flags, name in (([], "b"), (["--no-progress"], "c")):
        hidden = CliRunner().invoke(main, [*args, "--output", str(tmp_path / name), *flags])
        assert hidden.exit_code == 0 and "scoring " not in hidden.stderr, hidden.output


def test_the_score_log_has_no_download_bars_and_q_keeps_warnings_only(
    trained, workspace, tmp_path, monkeypatch
):
    """MLflow draws a progress bar for each artifact download (loading the model to score): in
    a scheduler's log, one line of carriage-returned redraws. The CLI turns it off by default;
    a user's own MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins. (MLflow draws it only where tqdm
    is installed, as most environments have it: the dev extra installs it.)"""
    from vaewatch.model import registry

    variable = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    monkeypatch.setenv(variable, "true")
    # an earlier test of this process may have fetched the model: a version is downloaded once
    # per process, and this test is about the downloads
    monkeypatch.setattr(registry, "_fetched", {})
    asked = _score_cli(trained, workspace / "holdout", tmp_path / "asked")
    assert asked.exit_code == 0, asked.output
    assert "Downloading artifacts" in asked.output  # what the default leaves out
    monkeypatch.delenv(variable)
    result = _score_cli(trained, workspace / "holdout", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Downloading artifacts" not in result.output and "\r" not in result.output
    assert "scored 5,000 of 5,000 rows (0 rejected)" in result.stderr
    # -q: the output folder on stdout, and on stderr warnings only (a drift alarm would be one)
    job, _ = trained
    quiet = CliRunner().invoke(
        main,
        ["-q", "score", "--input", str(workspace / "holdout"), "--output", str(tmp_path / "q"),
         "--model", "models:/transactions@champion", "--tracking-uri", job.tracking_uri],
    )  # fmt: skip
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == f"{tmp_path / 'q'}\n"
    assert all(line.startswith("drift alarm") for line in quiet.stderr.splitlines()), quiet.stderr


def test_a_day_where_every_row_is_flagged_keeps_scoring_cheap(trained, workspace, tmp_path, caplog):
    """Amounts in cents instead of dollars (x100): nearly every record is flagged (measured:
    4,994 of 5,000; a small amount x100 can stay within the model's tails). The leave-one-out
    attribution (a pass per feature) goes to the 100 most anomalous of each 1,000-row batch
    (max(64, 10 %)); the other flagged records keep the posterior's, and the run counts and
    says so, once."""
    table = pq.read_table(workspace / "holdout" / "part-0.parquet")
    i = table.schema.get_field_index("amount")
    cents = pc.multiply(table.column("amount"), 100.0)
    (tmp_path / "in").mkdir()
    pq.write_table(table.set_column(i, "amount", cents), tmp_path / "in" / "day.parquet")
    caplog.set_level(logging.WARNING, logger="vaewatch.pipeline.transforms")
    result = run(_job(trained, tmp_path, tmp_path / "in", batch_size=1000))
    flagged = _scores(tmp_path / "out")["is_anomaly"].to_numpy(zero_copy_only=False)
    assert result.manifest.rows.scored == 5_000 and flagged.mean() > 0.99
    assert result.counters["flagged_rows_posterior_attribution"] == flagged.sum() - 5 * 100
    warned = [r.getMessage() for r in caplog.records if "keep the top_features" in r.getMessage()]
    assert len(warned) == 1 and "more than 10% of a batch's records are flagged" in warned[0]
