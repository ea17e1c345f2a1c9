"""Beam's portable path, as Flink, Spark and Dataflow run Python: the pipeline goes through
Beam's Job API to a job service in another process, and its Python SDK workers start in a
separate external worker pool, where they download the pinned model from an MLflow server
(PostgreSQL behind it, the artifacts on S3). The
scores equal the in-process runner's bit for bit."""

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.conftest import TRAIN_EXCLUDE
from tests.servers import free_port, serve
from vaewatch.jobs.cli import main
from vaewatch.pipeline.commit import read_manifest

pytestmark = pytest.mark.slow


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
