"""The model artifact: a folder with everything needed to rebuild and score, nothing pickled.

    config.json           format version, vaewatch version, the VAE config, the feature spec
                          (normalisation, vocabularies), calibration (score quantiles, threshold,
                          per-feature baselines), scoring defaults (K, seed, proposal scale),
                          the id column, training config, history and data fingerprint, and
                          the sha256 of weights.safetensors (checked at every load)
    weights.safetensors   the state dict (safetensors: a header + raw tensors, no code runs)

A model trained on a GPU loads anywhere: tensors are read onto the CPU, then moved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vaewatch.model import defaults
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.errors import UserError
from vaewatch.model.estimation.noise import DESIGNS, SOBOL
from vaewatch.model.network.vae import VAE, VAEConfig

ARTIFACT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactError(UserError):
    """A model folder is incomplete or written by an incompatible version."""


@dataclass
class ScoringDefaults:
    k: int = defaults.K  # IWAE samples; the calibration was computed with K and the seed
    seed: int = defaults.SEED  # common-random-numbers seed
    top_features: int = defaults.TOP_FEATURES
    # q(z|x)'s standard deviation times this in the importance weights, chosen at training on
    # the validation rows (model/estimation/proposal.py `choose_proposal_scale`); 1 for models
    # saved before it
    proposal_scale: float = 1.0
    # the design of the K shared points (model/estimation/noise.py); "sobol" for models saved
    # before it
    points: str = defaults.POINTS


@dataclass
class ModelArtifact:
    spec: FeatureSpec
    vae_config: VAEConfig
    state_dict: dict[str, torch.Tensor]
    calibration: Calibration
    scoring: ScoringDefaults = field(default_factory=ScoringDefaults)
    id_column: str | None = None
    metadata: dict = field(default_factory=dict)  # model name, versions, training record

    @classmethod
    def from_model(cls, model: VAE, spec: FeatureSpec, calibration: Calibration, **kwargs):
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        return cls(
            spec=spec, vae_config=model.config, state_dict=state, calibration=calibration, **kwargs
        )

    def build(self, device: str | torch.device = "cpu") -> VAE:
        """The VAE with these weights, in eval mode, on `device`."""
        model = VAE(self.vae_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as err:
            raise ArtifactError(f"weights do not match the model config: {err}") from err
        return model.to(device).eval()

    def config_json(self) -> dict:
        return {
            "format_version": ARTIFACT_FORMAT_VERSION,
            "vae": self.vae_config.to_json(),
            "features": self.spec.to_json(),
            "calibration": self.calibration.to_json(),
            "scoring": asdict(self.scoring),
            "id_column": self.id_column,
            "metadata": self.metadata,
        }

    def save(self, directory: str | Path) -> Path:
        """Weights first, then config.json with the weights' sha256: a loader can tell a
        corrupted or swapped weights file from the one this config was saved with."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict, str(directory / WEIGHTS_FILE))
        config = {**self.config_json(), "weights_sha256": sha256_file(directory / WEIGHTS_FILE)}
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
        (directory / CONFIG_FILE).write_text(text + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ModelArtifact:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise ArtifactError(
                    f"model folder {str(directory)!r} has no {name}; it is not a vaewatch model "
                    "(or the download was incomplete)"
                )
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{directory / CONFIG_FILE} is not valid JSON: {err}") from err
        version = config.get("format_version")
        if version != ARTIFACT_FORMAT_VERSION:
            raise ArtifactError(
                f"model folder {str(directory)!r} has format_version {version!r}; this vaewatch "
                f"reads {ARTIFACT_FORMAT_VERSION}. Retrain the model or upgrade vaewatch."
            )
        unknown = _unknown_settings(config)
        if unknown:
            saved_by = config.get("metadata", {}).get("vaewatch_version", "unknown")
            raise ArtifactError(
                f"model folder {str(directory)!r} has settings this vaewatch does not know "
                f"({', '.join(unknown)}): it was saved by a newer vaewatch ({saved_by}). "
                "Upgrade vaewatch where the model is loaded, or retrain it with this version."
            )
        weights = directory / WEIGHTS_FILE
        expected = config.get("weights_sha256")
        if expected is not None and sha256_file(weights) != expected:
            raise ArtifactError(
                f"{weights} does not match the sha256 recorded in its {CONFIG_FILE} "
                f"(expected {expected}, found {sha256_file(weights)}): the file was corrupted "
                "or replaced after the model was saved. Re-download it, or re-register the model."
            )
        try:
            state_dict = load_file(str(weights), device="cpu")
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise ArtifactError(
                f"{weights} is not a readable safetensors file ({err}); re-download it, or "
                "re-register the model"
            ) from err
        return cls(
            spec=FeatureSpec.from_json(config["features"]),
            vae_config=VAEConfig.from_json(config["vae"]),
            state_dict=state_dict,
            calibration=Calibration.from_json(config["calibration"]),
            scoring=_scoring(config["scoring"], directory / CONFIG_FILE),
            id_column=config.get("id_column"),
            metadata=config.get("metadata", {}),
        )


def _scoring(saved: dict, path: Path) -> ScoringDefaults:
    """The scoring section as saved (`path`: its config.json). A model saved before a field was
    added was calibrated without it: Sobol points; "samples" (the ELBO's own draws, before it
    shared the K points) is read and ignored."""
    kept = {k: v for k, v in saved.items() if k != "samples"}
    scoring = ScoringDefaults(**{"points": SOBOL, **kept})
    if scoring.points not in DESIGNS:
        raise ArtifactError(
            f"{path} has scoring.points {scoring.points!r}; this vaewatch scores with "
            f"{' or '.join(repr(d) for d in DESIGNS)}. The model's calibration was computed on "
            "the points it was saved with: restore the file, or re-register the model."
        )
    return scoring


def _unknown_settings(config: dict) -> list[str]:
    """The fields of config.json's vae, calibration and scoring sections that this version's
    dataclasses do not have: a model saved by a later vaewatch, which added them (fields are
    only ever added, with defaults, so older models load)."""
    sections = {"vae": VAEConfig, "calibration": Calibration, "scoring": ScoringDefaults}
    legacy = {"scoring": {"samples"}}  # read and ignored: see `load`
    unknown = []
    for name, kind in sections.items():
        known = {f.name for f in fields(kind)} | legacy.get(name, set())
        unknown += [f"{name}.{key}" for key in config.get(name, {}) if key not in known]
    return unknown
