"""An MLflow server that is down: a clear exit 75 (retry later) after a few quick tries, nothing
written."""

import socket

from click.testing import CliRunner

from tests.conftest import TRAIN_EXCLUDE
from vaewatch.jobs.cli import main


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_score_and_train_against_a_server_that_is_down(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_closed_port()}"
    score = CliRunner().invoke(
        main,
        ["score", "--input", str(workspace / "holdout"), "--output", str(tmp_path / "out"),
         "--model", "models:/transactions@champion", "--tracking-uri", uri],
    )  # fmt: skip
    assert score.exit_code == 75, score.output
    assert "cannot reach the MLflow tracking server" in score.output and uri in score.output
    assert "Traceback" not in score.output and not (tmp_path / "out").exists()

    train = CliRunner().invoke(
        main,
        ["train", "--data", str(workspace / "train"), "--model-name", "m", "--epochs", "1",
         "--exclude", ",".join(TRAIN_EXCLUDE), "--tracking-uri", uri, "--no-progress"],
    )  # fmt: skip
    assert train.exit_code == 75, train.output
    assert "cannot reach the MLflow tracking server" in train.output
    assert not list(tmp_path.iterdir())  # no mlruns, no database, nothing


def _store_with_schema(path, revision: str) -> str:
    """A SQLite tracking store made by this MLflow, then marked as if another version wrote it.
    Made in a child process: MLflow caches a store per URI, schema check included."""
    import sqlite3
    import subprocess
    import sys

    uri = f"sqlite:///{path}"
    make = f"import mlflow; mlflow.MlflowClient(tracking_uri={uri!r}).search_experiments()"
    subprocess.run([sys.executable, "-c", make], check=True, capture_output=True)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    return uri


def test_a_store_written_by_another_mlflow_is_a_configuration_error(
    workspace, tmp_path, monkeypatch
):
    """Exit 1 naming both schemas and the fix that applies, not a crash (exit 70)."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # where a run would put its artifacts (./mlruns)

    cases = {
        # a revision this MLflow's migrations do not know: a newer MLflow wrote the store
        "ffffffffffff": "written by a newer MLflow",
        # one of this MLflow's own migrations, not its latest: an older MLflow wrote the store
        "451aebb31d03": "mlflow db upgrade",
    }
    for revision, fix in cases.items():
        uri = _store_with_schema(tmp_path / f"{revision}.db", revision)
        train = CliRunner().invoke(
            main,
            ["train", "--data", str(workspace / "train"), "--model-name", "m", "--epochs", "1",
             "--exclude", ",".join(TRAIN_EXCLUDE), "--tracking-uri", uri, "--no-progress"],
        )  # fmt: skip
        assert train.exit_code == 1, train.output
        assert f"has schema {revision}" in train.output and fix in train.output, train.output
        assert f"MLflow {mlflow.__version__}" in train.output
        assert "crashed" not in train.output
