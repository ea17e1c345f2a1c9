"""vaewatch as a library in a user's own Beam pipeline: the exported names, imports without side
effects, a scored schema derived from the registered model, one quiet download per process, and
the example pipeline in examples/, run with TestPipeline."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

import vaewatch.pipeline
from vaewatch.model import registry
from vaewatch.model.contract import REASON_COLUMN, score_schema
from vaewatch.model.data.features import SchemaMismatchError
from vaewatch.model.scoring import Scorer
from vaewatch.pipeline import ScoreRecords

REPO = Path(__file__).resolve().parents[2]
MODEL = "models:/transactions/1"


def _python(code: str, **env) -> dict:
    """Run `code` in a fresh interpreter with a clean OpenMP/malloc environment; it prints JSON."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GOMP_", "OMP_", "MALLOC_", "MLFLOW_"))
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
        cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_exported_name_resolves_and_is_listed():
    exported = vaewatch.pipeline.__all__
    assert sorted(exported) == sorted(vaewatch.pipeline._EXPORTS) and len(set(exported)) == len(
        exported
    )
    for name in vaewatch.pipeline.__all__:
        assert getattr(vaewatch.pipeline, name) is not None, name
    with pytest.raises(AttributeError, match="ScoreRecrods"):
        vaewatch.pipeline.ScoreRecrods  # noqa: B018 - the typo must fail by name


def test_importing_the_packages_loads_neither_beam_nor_torch_and_tunes_nothing():
    found = _python(
        "import json, os, sys\n"
        "import vaewatch.pipeline, vaewatch.model, vaewatch.model.contract\n"
        "print(json.dumps({'beam': 'apache_beam' in sys.modules, 'torch': 'torch' in sys.modules,"
        " 'spin': os.environ.get('GOMP_SPINCOUNT')}))"
    )
    assert found == {"beam": False, "torch": False, "spin": None}
    found = _python(
        "import json, os, sys\n"
        "from vaewatch.pipeline import ScoreRecords\n"
        "print(json.dumps({'beam': 'apache_beam' in sys.modules,"
        " 'spin': os.environ.get('GOMP_SPINCOUNT')}))"
    )
    assert found == {"beam": True, "spin": None}  # a used name loads what it needs, no more


def test_the_console_script_tunes_its_process_before_torch_loads():
    found = _python(
        "import json, os, sys\n"
        "from vaewatch.jobs import cli\n"
        "sys.argv = ['vaewatch', '--version']\n"
        "try:\n"
        "    cli.run()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps({'spin': os.environ.get('GOMP_SPINCOUNT'),"
        " 'torch': 'torch' in sys.modules}))"
    )
    assert found == {"spin": "1000", "torch": False}


def test_tuning_respects_the_users_policy_and_is_refused_after_torch():
    code = (
        "import json, sys\n"
        "{pre}\n"
        "from vaewatch.model import process\n"
        "print(json.dumps(process.tune()))"
    )
    assert _python(code.format(pre=""))["short_spin"] is True
    assert _python(code.format(pre="import torch"))["short_spin"] is False
    assert _python(code.format(pre=""), OMP_WAIT_POLICY="PASSIVE")["short_spin"] is False


def test_for_model_derives_the_scored_schema_and_pins_the_version(trained, workspace):
    job, outcome = trained
    schema = pq.read_schema(next((workspace / "holdout").glob("*.parquet")))
    score = ScoreRecords.for_model(
        "models:/transactions@champion", job.tracking_uri, input_schema=schema, keep=["record_id"]
    )
    latent = outcome.artifact.vae_config.latent_dim
    expected = pa.schema([schema.field("record_id"), *score_schema(latent)])
    assert score.scored_schema.equals(expected)
    assert score.rejected_schema.names == [*schema.names, REASON_COLUMN]
    settings = score._score._model
    assert settings.location.startswith("models:/transactions/") and "@" not in settings.location


def test_for_model_refuses_a_schema_without_the_models_features(trained, workspace):
    job, _ = trained
    schema = pq.read_schema(next((workspace / "holdout").glob("*.parquet")))
    narrowed = schema.remove(schema.get_field_index("amount"))
    with pytest.raises(SchemaMismatchError, match="amount"):
        ScoreRecords.for_model(MODEL, job.tracking_uri, input_schema=narrowed)
    with pytest.raises(SchemaMismatchError, match="no_such_column"):
        ScoreRecords.for_model(
            MODEL, job.tracking_uri, input_schema=schema, keep=["no_such_column"]
        )


def test_a_model_is_downloaded_once_per_process_without_progress_bars(
    trained, tmp_path, monkeypatch, capfd
):
    job, _ = trained
    import mlflow

    calls = []
    download = mlflow.artifacts.download_artifacts

    def counted(*args, **kwargs):
        calls.append(os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"))
        return download(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counted)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.setattr(registry, "_fetched", {})
    first = registry.load("models:/transactions/1", job.tracking_uri, tmp_path / "a")
    second = registry.load("models:/transactions/1", job.tracking_uri, tmp_path / "b")
    assert first.path == second.path and calls == ["false"]
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # put back as it was


def test_the_example_pipeline_scores_every_row_once(trained, workspace, tmp_path):
    job, outcome = trained
    spec = importlib.util.spec_from_file_location(
        "score_parquet_pipeline", REPO / "examples" / "score_parquet_pipeline.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    source = next((workspace / "holdout").glob("*.parquet"))
    table = pq.read_table(source).slice(0, 800)
    rows = table.to_pylist()
    for name in table.column_names:
        if name != "record_id":
            rows[3][name] = None  # nothing to score: rejected with a reason
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "in.parquet")

    with TestPipeline() as p:
        example.build(p, input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                      model=MODEL, tracking_uri=job.tracking_uri, keep=["record_id"])  # fmt: skip

    scored = pq.read_table(sorted((tmp_path / "out").glob("scored*.parquet")))
    rejected = pq.read_table(sorted((tmp_path / "out").glob("rejected*.parquet")))
    assert scored.num_rows + rejected.num_rows == 800
    assert rejected["record_id"].to_pylist() == [rows[3]["record_id"]]
    assert rejected[REASON_COLUMN].to_pylist() == ["all_features_missing"]
    # the scores are the model's own, whatever the batching
    direct = Scorer(outcome.artifact, model_version="transactions/1", device="cpu").score(
        pq.read_table(tmp_path / "in.parquet")
    )
    ids = pq.read_table(tmp_path / "in.parquet")["record_id"].take(pa.array(direct.scored_rows))
    want = dict(zip(ids.to_pylist(), direct.scores["anomaly_score"].to_pylist(), strict=True))
    got = dict(
        zip(scored["record_id"].to_pylist(), scored["anomaly_score"].to_pylist(), strict=True)
    )
    keys = sorted(want)
    assert sorted(got) == keys
    np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-12)
