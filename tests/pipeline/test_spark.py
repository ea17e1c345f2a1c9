"""Spark users, on a Spark master with separate executor processes (`local-cluster`: two
executors, each its own JVM with its own Python workers): the registered model scores through
mlflow.pyfunc.spark_udf with the same scores as the Beam pipeline for the same rows and seed, and
Spark reads a committed vaewatch output, following its manifest, with the same values."""

import json
import os
import sys

import mlflow
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from vaewatch.model.contract import spark_result_type
from vaewatch.pipeline.score import ScoreJob, run

pyspark = pytest.importorskip("pyspark", reason="pip install 'vaewatch[spark]'")

RESULT_TYPE = spark_result_type()


def test_the_result_type_is_the_contract_in_spark_terms():
    assert RESULT_TYPE.startswith(
        "struct<elbo: double, log_likelihood: double, log_likelihood_se: double, "
        "anomaly_score: double, score_percentile: double, is_anomaly: boolean, "
        "latent_mean: array<float>, latent_std: array<float>, top_features: "
        "array<struct<feature: string, contribution: double, basis: string, "
    )
    assert RESULT_TYPE.endswith(
        "likely: array<string>>>, baseline: string, model_version: string, reason: string>"
    )


@pytest.fixture(scope="module")
def spark():
    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers use this virtual environment
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local-cluster[2,1,1024]")
        .appName("vaewatch-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
    executors = session.sparkContext.parallelize(range(8), 8).map(lambda _: os.getpid())
    assert len(set(executors.collect())) == 2, "expected two executor processes"
    yield session
    session.stop()


def test_spark_udf_scores_equal_the_beam_pipeline(spark, trained, workspace, tmp_path, monkeypatch):
    job, outcome = trained
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pq.read_table(workspace / "holdout").slice(0, 400), source / "rows.parquet")
    beam_result = run(
        ScoreJob(
            input=str(source),
            output=str(tmp_path / "out"),
            model=outcome.resolved.uri,
            tracking_uri=job.tracking_uri,
        )
    )
    beam = ds.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("record_id")

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(job.tracking_uri)
    mlflow.set_registry_uri(job.tracking_uri)  # an earlier test may have pointed it elsewhere
    from pyspark.sql.functions import struct

    score = mlflow.pyfunc.spark_udf(
        spark,
        outcome.resolved.uri,
        result_type=RESULT_TYPE,
        env_manager="local",
        params={"model_version": beam_result.manifest.model.name + "/" + outcome.resolved.version},
    )
    frame = spark.read.parquet(str(source / "rows.parquet"))
    scored = (
        frame.withColumn("s", score(struct(*frame.columns)))
        .select("record_id", "s.*")
        .orderBy("record_id")
        .toPandas()
    )
    assert len(scored) == beam.num_rows == 400
    assert scored["record_id"].tolist() == beam["record_id"].to_pylist()
    np.testing.assert_allclose(
        scored["log_likelihood"].to_numpy(), beam["log_likelihood"].to_numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(scored["elbo"].to_numpy(), beam["elbo"].to_numpy(), rtol=1e-12)
    assert scored["is_anomaly"].tolist() == beam["is_anomaly"].to_pylist()
    assert scored["model_version"].tolist() == beam["model_version"].to_pylist()
    # a struct comes back as a Row (pyspark 3) or a dict (pyspark 4)
    first = [r.asDict() if hasattr(r, "asDict") else dict(r) for r in scored["top_features"][0]]
    assert first == beam["top_features"][0].as_py()
    assert (scored["reason"] == "").all()


def test_spark_reads_a_committed_output(spark, trained, workspace, tmp_path):
    """Only the files the manifest lists; fixed-size latent lists and the list of structs load."""
    job, outcome = trained
    out = tmp_path / "out"
    run(
        ScoreJob(
            input=str(workspace / "holdout"),
            output=str(out),
            model=outcome.resolved.uri,
            tracking_uri=job.tracking_uri,
        )
    )
    listed = json.loads((out / "_manifest.json").read_text())["files"]
    # a file the manifest does not list (debris, a half-published run) is not read
    (out / "part-stray.parquet").write_bytes((out / listed[0]).read_bytes())
    frame = spark.read.parquet(*[str(out / f) for f in listed])
    rows = frame.orderBy("record_id").toPandas()
    expected = ds.dataset([str(out / f) for f in listed], format="parquet").to_table()
    expected = expected.sort_by("record_id")
    assert len(rows) == expected.num_rows == 5_000
    np.testing.assert_array_equal(rows["log_likelihood"], expected["log_likelihood"].to_numpy())
    latent = expected["latent_mean"].to_pylist()
    assert [list(v) for v in rows["latent_mean"][:50]] == latent[:50]
    # a struct comes back as a Row (pyspark 3) or a dict (pyspark 4)
    as_dict = [
        [f.asDict() if hasattr(f, "asDict") else dict(f) for f in v]
        for v in rows["top_features"][:50]
    ]
    assert as_dict == (expected["top_features"].to_pylist()[:50])
