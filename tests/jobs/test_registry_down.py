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
