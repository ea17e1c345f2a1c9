"""MLflow in its production topology: the tracking and registry server backed by PostgreSQL,
its artifact store on S3 (`--artifacts-destination s3://...`), each a real server on this
machine. train -> register -> score -> promote -> score again, and a tampered artifact in the
bucket is refused by its registry digest."""

import subprocess
import sys

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from tests.conftest import MLFLOW_BUCKET as BUCKET
from tests.conftest import TRAIN_EXCLUDE
from vaewatch.jobs.cli import main
from vaewatch.pipeline.commit import read_manifest

pytestmark = pytest.mark.slow


def _cli(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, f"{args}: {result.output}"
    return result.output


def test_train_score_promote_on_postgres_and_s3(production_mlflow, workspace, tmp_path):
    url, aws = production_mlflow
    train = [
        "train", "--data", workspace / "train", "--model-name", "prod", "--epochs", 2,
        "--id-column", "record_id", "--exclude", ",".join(TRAIN_EXCLUDE),
        "--tracking-uri", url, "--no-progress",
    ]  # fmt: skip
    assert _cli(*train).strip().splitlines()[-1] == "models:/prod/1"
    assert _cli(*train, "--alias", "staging").strip().splitlines()[-1] == "models:/prod/2"

    def score(out):
        _cli(
            "score", "--input", workspace / "holdout", "--output", tmp_path / out, "--k", 2,
            "--model", "models:/prod@champion", "--tracking-uri", url,
        )  # fmt: skip
        return read_manifest(str(tmp_path / out))

    first = score("one")
    assert first.model.version == "1" and first.rows.rows_in == 5_000
    _cli("models", "--tracking-uri", url, "promote", "prod", "2")
    second = score("two")
    assert second.model.version == "2"
    assert second.rows.scored + second.rows.rejected == 5_000

    # overwrite version 2's config.json in the bucket: the registry's digest refuses it
    import boto3

    s3 = boto3.client("s3", **_client_settings(aws))
    configs = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]
        if o["Key"].endswith("vaewatch/config.json")
    ]
    model_id = MlflowClient(url).get_model_version("prod", "2").source.rsplit("/", 1)[-1]
    (newest,) = [k for k in configs if f"/{model_id}/" in k]
    body = s3.get_object(Bucket=BUCKET, Key=newest)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=newest, Body=body + b" ")
    refused = subprocess.run(
        [sys.executable, "-m", "vaewatch.jobs.cli", "score", "--input", str(workspace / "holdout"),
         "--output", str(tmp_path / "three"), "--model", "models:/prod@champion",
         "--tracking-uri", url],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "modified after registration" in refused.stderr
    assert not (tmp_path / "three").exists()


def _client_settings(aws: dict) -> dict:
    return {
        "endpoint_url": aws["AWS_ENDPOINT_URL"],
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
        "region_name": aws["AWS_DEFAULT_REGION"],
    }
