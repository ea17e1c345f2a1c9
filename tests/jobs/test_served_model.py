"""The registered model stands alone: a fresh virtual environment holding only what the model's
own requirements.txt lists (torch first, as a serving image would install it) loads it with
mlflow.pyfunc and serves it with `mlflow models serve --env-manager local`, answering a real
HTTP request with the score columns. vaewatch is not installed there: its code comes with the
model (code_paths)."""

import json
import os
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.servers import free_port, serve
from vaewatch.model.contract import REASON_COLUMN, SCORE_COLUMNS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_folder(trained, tmp_path_factory):
    job, _ = trained
    mlflow.set_tracking_uri(job.tracking_uri)
    mlflow.set_registry_uri(job.tracking_uri)  # an earlier test may have pointed it elsewhere
    root = tmp_path_factory.mktemp("served")
    return mlflow.artifacts.download_artifacts(
        "models:/transactions@champion", dst_path=str(root / "model")
    )


@pytest.fixture(scope="module")
def fresh_venv(model_folder, tmp_path_factory):
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    run = {"check": True, "capture_output": True, "text": True, "timeout": 900}
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], **run)
    subprocess.run([*pip, "-r", os.path.join(model_folder, "requirements.txt")], **run)
    return venv


def _frame(workspace, rows=6):
    frame = pq.read_table(workspace / "holdout").slice(0, rows).to_pandas()
    frame.loc[2, ["amount", "hour", "distance_km"]] = None  # a row with missing values
    frame.loc[5, "amount"] = 1e6  # a row flagged for its amount, explained in euros
    return frame


def test_requirements_pin_published_packages_to_the_training_environment(model_folder):
    """Each line is name==version, the version this (locked) environment has: the serving host
    gets the set the model was trained and tested with."""
    from importlib.metadata import version

    with open(os.path.join(model_folder, "requirements.txt")) as handle:
        lines = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    pins = dict(line.split("==") for line in lines if "==" in line)
    assert "vaewatch" not in pins
    assert {"torch", "safetensors", "pyarrow", "mlflow", "pandas", "numpy"} <= set(pins), lines
    assert pins == {name: version(name).split("+")[0] for name in pins}
    assert os.path.isfile(os.path.join(model_folder, "code", "vaewatch", "model", "scoring.py"))


def test_loads_and_serves_in_a_fresh_venv(model_folder, fresh_venv, workspace, tmp_path):
    python = str(fresh_venv / "bin" / "python")
    frame = _frame(workspace)
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "dataframe_split": json.loads(
                    frame.to_json(orient="split", index=False, date_format="iso")
                )
            }
        )
    )
    # what the launching environment's pyfunc answers, for comparison
    expected = mlflow.pyfunc.load_model(model_folder).predict(frame)

    probe = (
        "import importlib.util, json, sys, pandas as pd, mlflow\n"
        "assert importlib.util.find_spec('vaewatch') is None, 'vaewatch is installed'\n"
        "body = json.load(open(sys.argv[2]))['dataframe_split']\n"
        "frame = pd.DataFrame(body['data'], columns=body['columns'])\n"
        "out = mlflow.pyfunc.load_model(sys.argv[1]).predict(frame)\n"
        "print(out[['anomaly_score', 'log_likelihood']].to_json(orient='split'))\n"
    )
    loaded = subprocess.run(
        [python, "-c", probe, model_folder, str(request)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    values = np.array(json.loads(loaded.stdout)["data"], dtype=float)
    np.testing.assert_allclose(values[:, 0], expected["anomaly_score"], rtol=1e-6)

    port = free_port()
    env = dict(os.environ, PATH=f"{fresh_venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    command = [
        str(fresh_venv / "bin" / "mlflow"), "models", "serve", "-m", model_folder,
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with serve(command, f"{url}/ping", tmp_path / "serve.log", env=env):
        ask = urllib.request.Request(
            f"{url}/invocations",
            data=request.read_bytes(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(ask, timeout=60) as response:
            answer = json.load(response)["predictions"]
    assert len(answer) == len(frame)
    assert set(answer[0]) == {*SCORE_COLUMNS, REASON_COLUMN}
    scores = np.array([row["anomaly_score"] for row in answer], dtype=float)
    np.testing.assert_allclose(scores, expected["anomaly_score"], rtol=1e-6)
    assert len(answer[0]["latent_mean"]) == len(answer[0]["latent_std"]) > 0
    # the explanation travels with the served row: the amount, observed against expected
    assert answer[5]["is_anomaly"] and answer[5]["baseline"] == "global"
    first = answer[5]["top_features"][0]
    assert first["feature"] == "amount" and first["basis"] == "conditional"
    assert first["direction"] == "above" and float(first["observed"]) == 1e6
    assert first["low"] < first["expected"] < first["high"] < 1e6
