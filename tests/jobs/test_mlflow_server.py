"""Against a real MLflow tracking server (SQLite backend, proxied artifacts) on 127.0.0.1."""

import mlflow
import pytest
from click.testing import CliRunner

from tests.conftest import TRAIN_EXCLUDE
from tests.servers import mlflow_server
from vaewatch.jobs.cli import main
from vaewatch.model import registry


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root) as url:
        yield url, root


def test_train_over_http_and_load_back(server, workspace, tmp_path, monkeypatch):
    url, root = server
    monkeypatch.chdir(tmp_path)  # nothing may be written locally: artifacts go to the server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the CLI reads MLflow's own variable
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data", str(workspace / "train"),
            "--model-name", "served",
            "--id-column", "record_id",
            "--exclude", ",".join(TRAIN_EXCLUDE),
            "--epochs", "3",
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # stdout is the URI alone: MLflow's own "View run ... at: URL" lines (written to stdout
    # when a run against a server ends) are off, and train names the run's page on stderr
    assert result.stdout == "models:/served/1\n"
    assert f"; {url}/#/experiments/" in result.stderr and "/runs/" in result.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    stored = list((root / "artifacts").rglob("weights.safetensors"))
    assert stored, "the model's weights should be stored by the server"

    loaded = registry.load("models:/served@champion", url, destination=tmp_path / "dl")
    assert loaded.resolved.version == "1" and loaded.artifact.id_column == "record_id"
    assert loaded.artifact.build("cpu").config.latent_dim == 8

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)  # an earlier test may have pointed it elsewhere
    model = mlflow.pyfunc.load_model("models:/served@champion")
    import pyarrow.parquet as pq

    frame = pq.read_table(workspace / "holdout").slice(0, 50).to_pandas()
    assert len(model.predict(frame)) == 50
