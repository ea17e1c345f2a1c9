"""The model artifact: a folder with everything needed to rebuild and score, nothing pickled.

    config.json           format version, vaewatch version, the VAE config, the feature spec
                          (normalisation, vocabularies), calibration (score quantiles, threshold,
                          per-feature baselines), per-segment baselines (or null), scoring
                          defaults (K, seed, proposal scale), the id column, training config,
                          history and data fingerprint, and the sha256 of
                          weights.safetensors (checked at every load)
    weights.safetensors   the state dict (safetensors: a header + raw tensors, no code runs)

A model trained on a GPU loads anywhere: tensors are read onto the CPU, then moved.

config.json has one format version (ARTIFACT_FORMAT_VERSION). A model saved in an earlier
format is upgraded once, at load, by the steps in `UPGRADES` (one per version, each turning
format N into N + 1), and then read strictly: every field present, none unknown. Every change
to config.json bumps the version and adds its step there; nothing else in the package asks
which version saved a model.
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
from vaewatch.model.calibration.segments import Segments
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.errors import UserError
from vaewatch.model.estimation.noise import DESIGNS, SOBOL
from vaewatch.model.network.vae import VAE, VAEConfig

ARTIFACT_FORMAT_VERSION = 3
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
    # the validation rows (model/estimation/proposal.py `choose_proposal_scale`)
    proposal_scale: float = 1.0
    # the design of the K shared points (model/estimation/noise.py)
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
    # per-segment baselines (model/calibration/segments.py); None: one global baseline
    segments: Segments | None = None

    def calibrations(self) -> dict[str, Calibration]:
        """Each segment's baseline by value (none without segments)."""
        return {} if self.segments is None else self.segments.calibrations(self.calibration)

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
            "segments": None if self.segments is None else self.segments.to_json(),
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
        config = upgrade(config, directory)
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
            scoring=ScoringDefaults(**config["scoring"]),
            id_column=config["id_column"],
            metadata=config["metadata"],
            segments=Segments.from_json(config["segments"]),
        )


# ---------------------------------------------------------------- format versions


def upgrade(config: dict, directory: str | Path) -> dict:
    """`config` (config.json of the model folder `directory`) in this version's format, checked:
    a known format, every section's fields present and none unknown, a known point design."""
    where = f"model folder {str(directory)!r}"
    version = config.get("format_version")
    saved_by = (config.get("metadata") or {}).get("vaewatch_version", "unknown")
    if isinstance(version, int) and version > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{where} has format_version {version}, written by a newer vaewatch ({saved_by}); "
            f"this vaewatch reads formats 1 to {ARTIFACT_FORMAT_VERSION}. Upgrade vaewatch "
            "where the model is loaded, or retrain the model with this version."
        )
    if version not in UPGRADES and version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{where} has format_version {version!r}; this vaewatch reads formats 1 to "
            f"{ARTIFACT_FORMAT_VERSION}. Restore the folder's config.json, or retrain the model."
        )
    config = json.loads(json.dumps(config))  # the steps edit a copy
    while version != ARTIFACT_FORMAT_VERSION:
        config = UPGRADES[version](config)
        version = config["format_version"]
    _check_fields(config, where, saved_by)
    points = config["scoring"]["points"]
    if points not in DESIGNS:
        raise ArtifactError(
            f"{directory}/{CONFIG_FILE} has scoring.points {points!r}; this vaewatch scores with "
            f"{' or '.join(repr(d) for d in DESIGNS)}. The model's calibration was computed on "
            "the points it was saved with: restore the file, or re-register the model."
        )
    return config


def _from_format_1(config: dict) -> dict:
    """Format 1 (vaewatch 0.1.0) grew by adding fields with defaults, so a model without a
    field was trained before it existed. Each is written here with the value that scores such
    a model exactly as the version that saved it did:
    - vae: no categorical head split in two levels (`two_level_min` 0), no point masses, no
      missingness model (missing features marginalised), no per-feature variance floor;
    - features: no zero atom, no resolution, no missing values seen, training rows unknown (0);
      the spec's own format_version (1) is folded into the artifact's;
    - calibration: the "total" flag rule with no fitted tails, a score that is the plain
      -log_likelihood (missing values not completed, the discrete term at weight 1),
      attribution against -log p(x_j|z) medians, no drift reference;
    - scoring: the encoder's own q(z|x) (proposal scale 1) and scrambled Sobol points; the
      ELBO's separate draw count ("samples", before it shared the K points) is dropped."""
    vae = {
        "two_level_min": 0,
        "atom_features": [],
        "atom_values": [],
        "missing_features": [],
        "missing_log_prob": [],
        "variance_floor": [],
        **config["vae"],
    }
    features = {k: v for k, v in config["features"].items() if k != "format_version"}
    features.setdefault("rows", 0)
    features["features"] = [_feature_from_format_1(f) for f in features["features"]]
    calibration = {
        "top_feature_share": None,
        "top_feature_count": defaults.TOP_FEATURES,
        "completes_missing": False,
        "flag_rule": "total",
        "tail_start": None,
        "tail_scale": None,
        "surprise_quantiles": None,
        "surprise_outliers": 0.0,
        "conditional_term": False,
        "discrete_weight": 1.0,
        "conditional_baseline": None,
        **config["calibration"],
    }
    scoring = {"proposal_scale": 1.0, "points": SOBOL, "top_features": defaults.TOP_FEATURES}
    scoring.update({k: v for k, v in config["scoring"].items() if k != "samples"})
    return {
        **config,
        "format_version": 2,
        "vae": vae,
        "features": features,
        "calibration": calibration,
        "scoring": scoring,
        "id_column": config.get("id_column"),
        "metadata": config.get("metadata", {}),
    }


def _feature_from_format_1(feature: dict) -> dict:
    out = {"missing_share": 0.0, **feature}
    if feature["kind"] == "continuous":
        out = {"resolution": None, "zero_atom": False, **out}
    return out


def _from_format_2(config: dict) -> dict:
    """Format 2 (vaewatch 0.2.0) had one global baseline: no segments."""
    return {**config, "format_version": 3, "segments": None}


# format N -> the step that turns a format-N config.json into format N + 1
UPGRADES = {1: _from_format_1, 2: _from_format_2}


def _check_fields(config: dict, where: str, saved_by: str) -> None:
    """Every field of the vae, calibration and scoring sections present, none unknown. An
    unknown one is a model saved by a later vaewatch that added it without a format bump (a
    development build); a missing one, a config.json edited or cut short."""
    sections = {"vae": VAEConfig, "calibration": Calibration, "scoring": ScoringDefaults}
    unknown, missing = [], []
    for name, kind in sections.items():
        known = {f.name for f in fields(kind)}
        section = config.get(name, {})
        unknown += [f"{name}.{key}" for key in section if key not in known]
        missing += [f"{name}.{key}" for key in sorted(known) if key not in section]
    missing += [
        key for key in ("features", "id_column", "metadata", "segments") if key not in config
    ]
    if unknown:
        raise ArtifactError(
            f"{where} has settings this vaewatch does not know ({', '.join(unknown)}): it was "
            f"saved by a newer vaewatch ({saved_by}). Upgrade vaewatch where the model is "
            "loaded, or retrain it with this version."
        )
    if missing:
        raise ArtifactError(
            f"{where} has a {CONFIG_FILE} without {', '.join(missing)}: the file was edited or "
            "cut short. Restore it from the registry (re-download the model), or re-register it."
        )
