"""Spark users: the registered model scores in a local Spark session through
mlflow.pyfunc.spark_udf, with the same scores as the Beam pipeline for the same rows and seed."""

import os
import sys

import mlflow
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from vaewatch.pipeline.score import ScoreJob, run

pyspark = pytest.importorskip("pyspark", reason="pip install 'vaewatch[spark]'")

RESULT_TYPE = (
    "struct<elbo: double, log_likelihood: double, log_likelihood_se: double, "
    "anomaly_score: double, "
    "score_percentile: double, is_anomaly: boolean, latent_mean: array<float>, "
    "latent_std: array<float>, top_features: array<struct<feature: string, "
    "contribution: double>>, model_version: string, reason: string>"
)


@pytest.fixture(scope="module")
def spark():
    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers use this virtual environment
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("vaewatch-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
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
    first = [dict(r) for r in scored["top_features"][0]]
    assert first == beam["top_features"][0].as_py()
    assert (scored["reason"] == "").all()
