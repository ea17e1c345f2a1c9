"""The model artifact: exact round trip, nothing unpickled, clear errors for broken folders."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from vaewatch.model.artifact import ArtifactError, ModelArtifact, ScoringDefaults
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.synthetic import LABEL_COLUMNS


@pytest.fixture(scope="module")
def artifact(transactions_table):
    spec = FeatureSpec.fit(transactions_table, exclude=LABEL_COLUMNS)
    torch.manual_seed(0)
    model = VAE(VAEConfig.for_spec(spec, hidden=[16])).eval()
    enc = spec.encode(transactions_table)
    s = score_records(model, enc.x, enc.mask, log_std=spec.continuous_log_std, k=8)
    calibration = Calibration.fit(s.anomaly_score.numpy(), s.feature_nll.numpy())
    return ModelArtifact.from_model(
        model,
        spec,
        calibration,
        scoring=ScoringDefaults(k=8, seed=3, proposal_scale=1.25),
        id_column="record_id",
    ), enc


def test_round_trip_is_exact_and_never_unpickles(artifact, tmp_path, monkeypatch):
    art, enc = artifact
    art.save(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("loading a model must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    again = ModelArtifact.load(tmp_path)
    assert again.spec == art.spec and again.vae_config == art.vae_config
    assert again.calibration == art.calibration and again.scoring == art.scoring
    assert again.id_column == "record_id"
    a, b = art.build(), again.build()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    log_std = art.spec.continuous_log_std
    assert torch.equal(
        score_records(a, enc.x, enc.mask, log_std=log_std, k=8).log_likelihood,
        score_records(b, enc.x, enc.mask, log_std=log_std, k=8).log_likelihood,
    )


def test_weights_are_safetensors_and_config_is_plain_json(artifact, tmp_path):
    art, _ = artifact
    art.save(tmp_path)
    raw = (tmp_path / "weights.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(art.state_dict)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == 3 and config["scoring"]["k"] == 8
    assert config["segments"] is None  # one global baseline
    assert "format_version" not in config["features"]  # one version, the artifact's
    assert len(config["calibration"]["quantiles"]) == len(config["calibration"]["levels"])
    assert np.all(np.diff(config["calibration"]["quantiles"]) >= 0)


def test_a_model_saved_by_0_2_0_has_one_global_baseline(artifact, tmp_path):
    """Format 2 had no segments key: the upgrade says there are none, and the model loads."""
    art, _ = artifact
    art.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 2
    del config["segments"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ModelArtifact.load(tmp_path)
    assert loaded.segments is None and loaded.calibration == art.calibration


def test_a_model_saved_before_the_proposal_scale_scores_with_the_encoders_q(artifact, tmp_path):
    art, _ = artifact
    art.save(tmp_path)
    assert ModelArtifact.load(tmp_path).scoring.proposal_scale == 1.25
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 1  # 0.1.0's format, which added fields without a version
    del config["scoring"]["proposal_scale"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelArtifact.load(tmp_path).scoring == ScoringDefaults(k=8, seed=3)


def test_a_model_saved_before_the_spherical_points_scores_with_sobols(
    artifact, transactions_table, tmp_path
):
    """Its calibration was computed on Sobol points, so it keeps scoring on them: the Scorer's
    log_likelihood is the estimator's with points="sobol", not the default design's."""
    from vaewatch.model.estimation.noise import SOBOL, SPHERICAL
    from vaewatch.model.scoring import Scorer

    art, _ = artifact
    art.save(tmp_path)
    assert ModelArtifact.load(tmp_path).scoring.points == SPHERICAL
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 1
    del config["scoring"]["points"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = ModelArtifact.load(tmp_path)
    assert old.scoring.points == SOBOL
    table = transactions_table.slice(0, 500)
    enc = art.spec.encode(table)
    model, log_std = art.build(), art.spec.continuous_log_std
    scored = {}
    for points, saved in ((SPHERICAL, art), (SOBOL, old)):
        scorer = Scorer(saved, model_version="1", device="cpu", precision="fp32")
        scored[points] = scorer.score(table).scores.column("log_likelihood").to_numpy()
        expected = score_records(
            model, enc.x, enc.mask, log_std=log_std, k=8, seed=3, proposal_scale=1.25,
            points=points,
        ).log_likelihood.numpy()  # fmt: skip
        np.testing.assert_allclose(scored[points], expected, rtol=1e-12, atol=1e-9)
    assert not np.allclose(scored[SPHERICAL], scored[SOBOL])


def test_broken_folders_name_the_problem(artifact, tmp_path):
    art, _ = artifact
    art.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["scoring"]["points"] = "halton"  # an edited config.json
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="scoring.points 'halton'.*'spherical' or 'sobol'"):
        ModelArtifact.load(tmp_path)
    art.save(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="has no weights.safetensors"):
        ModelArtifact.load(tmp_path)
    art.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="format_version 99"):
        ModelArtifact.load(tmp_path)


@pytest.mark.parametrize(
    "section, key", [("calibration", "surprise_tail"), ("vae", "gate"), ("scoring", "shards")]
)
def test_a_model_saved_by_a_newer_vaewatch_names_what_it_does_not_know(
    artifact, tmp_path, section, key
):
    """Fields are only ever added to the artifact; an older vaewatch reading a newer model
    would otherwise fail with a TypeError from a dataclass constructor (exit 70, "crashed")."""
    art, _ = artifact
    art.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[section][key] = 1.0
    config.setdefault("metadata", {})["vaewatch_version"] = "99.0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ArtifactError, match=rf"does not know \({section}\.{key}\).*newer vaewatch \(99\.0\)"
    ):
        ModelArtifact.load(tmp_path)
