"""`vaewatch train`: registry, reload, pyfunc, pickle-free loading, calibration, bad input."""

import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from vaewatch.jobs import logs
from vaewatch.jobs.cli import main
from vaewatch.model import defaults, registry
from vaewatch.model.contract import SCORE_COLUMNS
from vaewatch.model.data.training_data import row_uniforms
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.metrics import roc_auc
from vaewatch.model.scoring import Scorer, ScoringOverrides


def test_registered_with_alias_tags_params_metrics_and_plots(trained):
    job, outcome = trained
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    version = client.get_model_version_by_alias("transactions", "champion")
    assert str(version.version) == outcome.resolved.version
    assert outcome.resolved.uri == f"models:/transactions/{version.version}"
    fingerprint = outcome.artifact.metadata["data_fingerprint"]
    assert version.tags["data_fingerprint"] == fingerprint["digest"]
    assert version.tags["vaewatch_version"] == outcome.artifact.metadata["vaewatch_version"]
    assert fingerprint["rows"] == 15_000 and len(fingerprint["files"]) == 3

    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.learning_rate"] == "0.001" and p["score.k"] == "auto"
    assert p["score.points"] == "spherical"  # the design the calibration was computed on
    # the robust-training fields as run: the large-table profile for 15,000 rows, not "None"
    large = defaults.LARGE_TABLE_TRAINING
    for name in ("robust_trim", "trim_weight", "trim_from_start", "weight_prior"):
        assert p[f"train.{name}"] == str(large[name]), name
        assert outcome.artifact.metadata["train_config"][name] == large[name], name
    assert p["data.rows"] == "15000" and p["data.digest"] == fingerprint["digest"]
    assert p["id_column"] == "record_id" and "record_id" not in p["features.names"]
    epochs = len(outcome.history)
    for metric in ("train_elbo", "val_elbo", "val_iwae", "active_units", "kl_dim_0"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == epochs, metric
    active = client.get_metric_history(run.info.run_id, "active_units")[-1].value
    assert 1 <= active <= 8
    # the K chosen after training, what the refit set aside (model/training/loop.py SetAside)
    chosen = outcome.artifact.scoring.k
    assert chosen in defaults.K_LADDER
    assert client.get_metric_history(run.info.run_id, "score_k")[-1].value == chosen
    robust = outcome.artifact.metadata["robust"]
    logged = client.get_metric_history(run.info.run_id, "robust_set_aside_rows")[-1].value
    assert logged == robust["rows"] and 0 <= robust["share"] < 0.05
    cal = outcome.artifact.calibration
    for metric, value in (
        ("calibration_outliers", cal.surprise_outliers),
        ("calibration_flagged_share", cal.flagged_share()),
        ("calibration_discrete_weight", cal.discrete_weight),
    ):
        logged = client.get_metric_history(run.info.run_id, metric)[-1].value
        assert logged == pytest.approx(value), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/loss_curves.png", "plots/score_histogram.png"}
    assert any(a.path == "config.json" for a in client.list_artifacts(run.info.run_id))


def test_calibration_is_the_production_score_of_the_held_out_rows(trained, workspace):
    """Re-derive the calibration independently: pick the held-out rows by their seeded hash,
    score them with the registered artifact through the production Scorer, and compare; then
    check the threshold on normal rows of a day the model never saw."""
    _, outcome = trained
    cal = outcome.artifact.calibration
    assert cal.threshold_quantile == 0.99
    files = sorted((workspace / "train").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    held = row_uniforms(np.arange(table.num_rows), seed=0) < 0.1  # TrainConfig's split
    # calibration runs in float32 whatever the scoring precision (docs/numbers.md: Precision)
    scorer = Scorer(outcome.artifact, model_version="x", device="cpu", precision="fp32")
    result = scorer.score(table.filter(pa.array(held)))
    scores = np.sort(result.scores["anomaly_score"].to_numpy())
    assert cal.rows == len(scores) == len(result.scored_rows) > 1_000
    np.testing.assert_allclose(np.sort(outcome.calibration_scores), scores, rtol=1e-9)
    assert cal.score_quantile(0.99) == pytest.approx(np.quantile(scores, 0.99), rel=1e-9)
    assert len(cal.feature_baseline) == len(outcome.artifact.spec.features)
    # those rows hold the training days' injected anomalies (0.5 %); the ones no tail of the
    # others explains are set aside (at most half of 1 - q), and the flag threshold is the 0.99
    # quantile of the rest: the calibration rows are flagged at 1 % of those and the rows set
    # aside (`flagged_share`), up to a row for rounding the count and one for the threshold's
    # interpolation between the stored quantile levels (0.001 apart: 1.5 rows here; measured
    # once: 24 flagged against 22.9, 23 above the exact quantile)
    flagged_held = result.aligned()["is_anomaly"].to_numpy(zero_copy_only=False).astype(bool)
    injected = table.filter(pa.array(held))["is_injected_anomaly"].to_numpy()
    assert cal.set_aside(0.99) == pytest.approx(min(cal.surprise_outliers, 0.005))
    assert cal.set_aside(0.99) > 0
    assert cal.flagged_share() == pytest.approx(1 - 0.99 * (1 - cal.set_aside(0.99)))
    assert abs(flagged_held.sum() - cal.flagged_share() * len(scores)) < 2.0
    # the flag catches the anomalies, so normal rows get about the 1 % of the rows kept: on an
    # unseen day they are flagged at the rate of the calibration's normal rows (binomial sd over
    # ~1,520 and ~4,750 rows: < 0.3 %; 3-4 sd)
    expected = flagged_held[~injected].mean()
    assert 0.005 < expected < 0.015
    holdout = pq.read_table(workspace / "holdout")
    flagged = scorer.score(holdout).aligned()["is_anomaly"].to_numpy(zero_copy_only=False)
    normal = ~holdout["is_injected_anomaly"].to_numpy()
    assert abs(np.mean(flagged[normal].astype(float)) - expected) < 0.008


def test_the_flag_rule_can_be_overridden_at_scoring(trained, workspace):
    _, outcome = trained
    holdout = pq.read_table(workspace / "holdout")
    total = Scorer(
        outcome.artifact,
        model_version="x",
        device="cpu",
        overrides=ScoringOverrides(flag_rule="total"),
    )
    assert total.flag_rule == "total"
    scored = total.score(holdout).scores
    flagged = scored["is_anomaly"].to_numpy(zero_copy_only=False)
    cut = outcome.artifact.calibration.score_quantile(0.99)
    np.testing.assert_array_equal(flagged, scored["anomaly_score"].to_numpy() > cut)
    assert ScoringOverrides().resolve(outcome.artifact).flag_rule == "any"


def test_reloaded_model_scores_exactly_like_the_in_memory_one(trained, workspace):
    job, outcome = trained
    loaded = registry.load("models:/transactions@champion", job.tracking_uri)
    assert loaded.resolved.version == outcome.resolved.version
    model = loaded.artifact.build("cpu")
    table = pq.read_table(workspace / "holdout")
    enc = loaded.artifact.spec.encode(table)
    log_std = loaded.artifact.spec.continuous_log_std
    a = score_records(model, enc.x, enc.mask, log_std=log_std, k=64)
    b = score_records(outcome.model.cpu(), enc.x, enc.mask, log_std=log_std, k=64)
    assert torch.equal(a.log_likelihood, b.log_likelihood) and torch.equal(a.elbo, b.elbo)
    labels = table.column("is_injected_anomaly").to_numpy()
    auc = roc_auc(a.anomaly_score.numpy(), labels)
    assert auc > 0.95, auc


PYFUNC_SCRIPT = textwrap.dedent(
    """
    import sys, mlflow, pyarrow.parquet as pq
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model("models:/transactions@champion")
    frame = pq.read_table(sys.argv[2]).slice(0, 500).to_pandas()
    model.predict(frame).to_parquet(sys.argv[3])
    """
)


def test_pyfunc_loads_with_pickle_disallowed_and_equals_native_scoring(
    trained, workspace, tmp_path
):
    job, outcome = trained
    holdout = workspace / "holdout" / "part-0.parquet"
    out = tmp_path / "pyfunc.parquet"
    env = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", PYFUNC_SCRIPT, job.tracking_uri, str(holdout), str(out)],
        env=env,
        capture_output=True,
        text=True,
        cwd=workspace,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = pq.read_table(out).to_pandas()
    assert list(predicted.columns) == [*SCORE_COLUMNS, "reason"]

    table = pq.read_table(holdout).slice(0, 500)
    native = Scorer(outcome.artifact, model_version="x", device="cpu").score(table)
    assert len(predicted) == 500 and native.scores.num_rows + len(native.rejected_rows) == 500
    rows = native.scored_rows
    np.testing.assert_array_equal(
        predicted["log_likelihood"].to_numpy()[rows], native.scores["log_likelihood"].to_numpy()
    )
    np.testing.assert_array_equal(
        predicted["elbo"].to_numpy()[rows], native.scores["elbo"].to_numpy()
    )
    np.testing.assert_array_equal(
        predicted["is_anomaly"].to_numpy()[rows].astype(bool),
        native.scores["is_anomaly"].to_numpy(),
    )
    assert predicted["top_features"][rows[0]].tolist() == native.scores["top_features"][0].as_py()
    assert (predicted["reason"].to_numpy()[rows] == "").all()


def test_pickled_models_are_refused_under_the_same_setting(tmp_path, monkeypatch):
    """Control: the environment variable is effective, so the test above is not vacuous."""

    class Pickled(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    mlflow.pyfunc.save_model(str(tmp_path / "pickled"), python_model=Pickled())
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(mlflow.exceptions.MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(str(tmp_path / "pickled"))


def test_rejected_rows_in_the_native_scorer(trained):
    _, outcome = trained
    spec = outcome.artifact.spec
    table = pq.read_table(
        next(iter(outcome.artifact.metadata["data_fingerprint"]["files"]))["path"]
    ).slice(0, 4)
    amount = pa.array([np.inf, 1.0, 2.0, 3.0])
    table = table.set_column(table.schema.get_field_index("amount"), "amount", amount)
    nulls = {f.name: pa.nulls(4, table.schema.field(f.name).type) for f in spec.features}
    for name, column in nulls.items():
        values = table.column(name).to_pylist()
        values[1] = None
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(values, column.type)
        )
    result = Scorer(outcome.artifact, model_version="v", device="cpu").score(table)
    assert result.rejected_rows.tolist() == [0, 1]
    assert result.reasons.to_pylist() == ["non_finite_value", "all_features_missing"]
    assert result.scored_rows.tolist() == [2, 3] and result.scores.num_rows == 2


def test_cli_train_prints_the_model_uri(in_workspace):
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(in_workspace / "train"),
            "--model-name",
            "cli-model",
            "--id-column",
            "record_id",
            "--exclude",
            "event_time,is_injected_anomaly,anomaly_kind",
            "--epochs",
            "2",
            "--alias",
            "candidate",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "models:/cli-model/1"
    # the operator's lines, on stderr; two epochs are inside the KL warm-up, where early
    # stopping chooses none (it used to print "best epoch -1")
    assert "trained 2 epochs, all inside the 5-epoch KL warm-up: none was chosen" in result.stderr
    resolved = registry.resolve("models:/cli-model@candidate", registry.default_tracking_uri())
    assert resolved.version == "1"


def test_cli_train_quiet_prints_only_the_model_uri(in_workspace):
    """-q: "only warnings and errors on stderr": none of the job's lines, and MLflow's own
    INFO lines ("Successfully registered model ...") off too; stdout is the URI alone."""
    import logging

    data = str(in_workspace / "train")
    args = ["-q", "train", "--data", data, "--model-name", "quiet-model", "--id-column",
            "record_id", "--exclude", "event_time,is_injected_anomaly,anomaly_kind",
            "--epochs", "1"]  # fmt: skip
    try:
        for version in (1, 2):  # a new name, then a new version of it (another MLflow notice)
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            assert result.stderr == "" and result.stdout == f"models:/quiet-model/{version}\n"
        assert not logging.getLogger("mlflow").isEnabledFor(logging.INFO)
    finally:
        logs.configure(0, "text")
    assert logging.getLogger("mlflow").isEnabledFor(logging.WARNING)


def test_train_names_the_columns_it_does_not_model(tmp_path, monkeypatch):
    """Timestamps, dates and nested columns are skipped when no --features list is given; the
    operator is told which, with their types, and --exclude silences it."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    n = 300
    pq.write_table(
        pa.table({
            "record_id": np.arange(n),
            "amount": rng.normal(size=n),
            "kind": rng.choice(["a", "b"], n),
            "seen_at": pa.array(np.arange(n).astype("datetime64[us]"), pa.timestamp("us")),
            "tags": pa.array([["x"]] * n, pa.list_(pa.string())),
        }),
        tmp_path / "part-0.parquet",
    )  # fmt: skip
    args = ["train", "--data", str(tmp_path), "--model-name", "unused", "--id-column",
            "record_id", "--epochs", "1", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "features: amount (continuous), kind (categorical)" in result.stderr
    # 300 rows: a narrowed network, and the small-table training profile named
    assert "network: 32x32 units, 5 latent dimensions; robust training (small-table" in (
        result.stderr
    )
    small = "the worst 20% of each batch at weight 0.2 from the start, the worst 5% left out"
    assert small in result.stderr
    assert "not used (" in result.stderr
    assert "seen_at (timestamp[us]), tags (list<element: string>)" in result.stderr
    result = CliRunner().invoke(main, [*args, "--exclude", "seen_at,tags"])
    assert result.exit_code == 0, result.output
    assert "not used" not in result.stderr
    result = CliRunner().invoke(main, [*args, "--training-profile", "large"])
    assert result.exit_code == 0, result.output
    assert (
        "robust training (large-table profile unless given): the worst 5% of each batch left "
        "out after the warm-up, then a refit of the plain likelihood without the rows beyond 3 "
        "interquartile ranges of the robust fit's upper quartile, weight prior 0" in result.stderr
    )
    # one epoch, inside the KL warm-up: no epoch is chosen, so there is no robust fit to refit
    assert "refit:" not in result.stderr


def test_train_checks_every_file_against_the_first_before_reading(tmp_path, monkeypatch):
    """The features come from the first file's schema. A later file without one of them, or with
    a type of another kind, is refused before training (exit 1, nothing registered); a column
    only later files have is named as not used; int64 beside double and dictionary-encoded beside
    plain strings are the same kinds and train."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    n = 400

    def write(folder, i, **changes):
        columns = {"amount": rng.normal(size=n), "count": rng.normal(size=n),
                   "kind": rng.choice(["a", "b", "c"], n)}  # fmt: skip
        columns.update(changes)
        (tmp_path / folder).mkdir(exist_ok=True)
        pq.write_table(pa.table({k: v for k, v in columns.items() if v is not None}),
                       tmp_path / folder / f"part-{i}.parquet")  # fmt: skip

    def train(folder, *extra):
        args = ["train", "--data", str(tmp_path / folder), "--model-name", folder,
                "--epochs", "1", "--no-progress", *extra]  # fmt: skip
        return CliRunner().invoke(main, args)

    write("ok", 0)
    as_dictionary = pa.array(rng.choice(["a", "b"], n)).dictionary_encode()
    write("ok", 1, count=rng.integers(0, 9, n), kind=as_dictionary)
    write("ok", 2, later=rng.normal(size=n))
    result = train("ok")
    assert result.exit_code == 0, result.output
    assert "later training files but not the first" in result.stderr
    assert "'later' (1 file(s), from " in result.stderr and "part-2.parquet" in result.stderr

    write("lacking", 0)
    write("lacking", 1, kind=None)
    result = train("lacking")
    assert result.exit_code == 1, result.output
    assert "part-1.parquet' has no column(s) ['kind']" in result.stderr
    assert "--exclude kind" in result.stderr
    assert mlflow.MlflowClient().search_registered_models("name='lacking'") == []
    assert train("lacking", "--exclude", "kind").exit_code == 0

    write("kinds", 0)
    write("kinds", 1, count=rng.integers(0, 9, n).astype(str))  # numbers written as text
    result = train("kinds")
    assert result.exit_code == 1, result.output
    assert "column 'count' is double (read as continuous) in the first training file" in (
        result.stderr
    )
    assert "but string in" in result.stderr and "part-1.parquet" in result.stderr

    # an empty first file, then one where the string column is all null (Arrow's null type):
    # the column's kind comes from the first file with values, whatever the batches' order
    write("gaps", 0, amount=np.zeros(0), count=np.zeros(0), kind=pa.array([], pa.string()))
    write("gaps", 1, kind=pa.nulls(n))
    write("gaps", 2)
    result = train("gaps")
    assert result.exit_code == 0, result.output
    assert "features: amount (continuous), count (continuous), kind (categorical)" in (
        result.stderr
    )
    assert "not used" not in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "{root}/train/*.csv"], "matched no Parquet files"),
        (["--data", "{root}/nowhere"], "does not exist"),
        (["--data", "{root}/train", "--exclude", "no_such_column"], "no_such_column"),
        (["--data", "{root}/train", "--id-column", "record_key"], "record_key"),
        (["--data", "{root}/bad", "--features", "amount,empty"], "have no non-null values"),
        (
            ["--data", "{root}/train", "--continuous", "merchant_category"],
            "named continuous but has type dictionary",
        ),
    ],
)
def test_bad_input_exits_1_with_a_clear_message(in_workspace, extra, message):
    bad = in_workspace / "bad"
    if not bad.exists():
        bad.mkdir()
        pq.write_table(
            pa.table({"amount": [1.0, 2.0, 3.0], "empty": pa.nulls(3, pa.float64())}),
            bad / "part-0.parquet",
        )
    args = ["train", "--model-name", "never", "--no-progress"]
    args += [a.format(root=in_workspace) for a in extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    with pytest.raises(registry.ModelNotFoundError):
        registry.resolve("models:/never", registry.default_tracking_uri())


def test_missing_model_is_a_clear_error(trained):
    job, _ = trained
    with pytest.raises(
        registry.ModelNotFoundError, match="Registered models there: .*transactions"
    ):
        registry.resolve("models:/nope@champion", job.tracking_uri)
    with pytest.raises(registry.ModelNotFoundError, match="malformed"):
        registry.resolve("models:/a/b/c", job.tracking_uri)
    # an alias the model lacks: MLflow calls it an invalid parameter; it used to be reported
    # as the server failing
    with pytest.raises(registry.ModelNotFoundError) as missing:
        registry.resolve("models:/transactions@chamipon", job.tracking_uri)
    assert "registered model 'transactions'" in str(missing.value)
    assert "has no alias 'chamipon' (its aliases: @champion -> version " in str(missing.value)
    assert "vaewatch models promote transactions VERSION --alias chamipon" in str(missing.value)


def test_the_discrete_weight_ranks_the_sparse_kinds_first(trained, workspace):
    """The holdout's unseen merchants and impossible merchant/channel pairs are discrete-part
    anomalies: ranked by the plain surprisal (-log_likelihood) the numbers' spread dilutes them,
    by anomaly_score, whose -log p(x_d|x_c) counts discrete_weight times, they come out above
    every kind of normal spread (>= 0.99), with at most half the misranked pairs (measured:
    impossible combinations 0.9855 -> 0.9996 since the refit, 0.96-0.97 -> 0.99+ before it)."""
    _, outcome = trained
    assert 2.0 < outcome.artifact.calibration.discrete_weight < 10.0
    table = pq.read_table(workspace / "holdout")
    scored = Scorer(outcome.artifact, model_version="t", device="cpu").score(table)
    kinds = np.asarray(table["anomaly_kind"].to_pylist())[scored.scored_rows]
    weighted = scored.scores["anomaly_score"].to_numpy()
    plain = -scored.scores["log_likelihood"].to_numpy()
    for kind in ("rare_category", "impossible_combination"):
        rows = (kinds == "") | (kinds == kind)
        got = roc_auc(weighted[rows], kinds[rows] == kind)
        plain_auc = roc_auc(plain[rows], kinds[rows] == kind)
        assert got >= 0.99 and 1.0 - got <= 0.5 * (1.0 - plain_auc), (kind, got, plain_auc)


def test_a_threshold_on_too_few_validation_rows_is_warned_about(caplog):
    """Fewer than 10 validation rows above the threshold quantile: a warning with the rows it
    would take; enough rows: none."""
    from vaewatch.jobs.train import _warn_if_few_above

    with caplog.at_level("WARNING", logger="vaewatch"):
        assert not _warn_if_few_above(1_000, 0.99) and not _warn_if_few_above(100, 0.9)
        assert not caplog.records
        assert _warn_if_few_above(999, 0.99)
    message = caplog.records[-1].getMessage()
    assert "quantile 0.99 of 999 validation rows, has 9.99 of them above it" in message
    assert "1,000 validation rows give it 10" in message
    with caplog.at_level("WARNING", logger="vaewatch"):
        assert _warn_if_few_above(12, 0.9)
    assert "12 validation rows, has 1.2 of them above it" in caplog.records[-1].getMessage()
