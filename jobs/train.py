"""`vaewatch train`: Parquet -> feature spec -> VAE -> calibration -> MLflow model version."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click
import mlflow
import numpy as np
import torch

from jobs import plots
from model import registry
from model.artifact import ModelArtifact, ScoringDefaults
from model.calibration import DEFAULT_THRESHOLD_QUANTILE, Calibration
from model.data import ParquetSource
from model.estimators import DEFAULT_K, DEFAULT_SAMPLES, DEFAULT_SEED, score_records
from model.features import FeatureSpec
from model.training import EpochStats, TrainConfig, TrainingData, resolve_device, train
from model.vae import VAE, VAEConfig
from model.version import package_version


@dataclass
class TrainJob:
    data: str
    model_name: str
    tracking_uri: str
    experiment: str = registry.DEFAULT_EXPERIMENT
    alias: str = registry.DEFAULT_ALIAS
    id_column: str | None = None
    exclude: Sequence[str] = ()
    features: Sequence[str] | None = None
    categorical: Sequence[str] = ()
    continuous: Sequence[str] = ()
    max_categories: int = 1000
    min_category_count: int = 1
    latent_dim: int = 8
    hidden: Sequence[int] = (128, 128)
    train: TrainConfig = field(default_factory=TrainConfig)
    k: int = DEFAULT_K
    samples: int = DEFAULT_SAMPLES
    score_seed: int = DEFAULT_SEED
    threshold_quantile: float = DEFAULT_THRESHOLD_QUANTILE
    max_validation_rows: int = 200_000
    cache_bytes: int = 2 * 2**30
    progress: bool = True
    artifact_location: str | None = None  # for a new experiment; None: MLflow's default


@dataclass
class TrainOutcome:
    resolved: registry.ResolvedModel
    artifact: ModelArtifact
    model: VAE
    history: list[EpochStats]
    best_epoch: int
    calibration_scores: np.ndarray


def _pip_requirements() -> list[str]:
    import pyarrow
    import safetensors

    return [
        f"vaewatch=={package_version()}",
        f"torch>={torch.__version__.split('+')[0]}",
        f"safetensors>={safetensors.__version__}",
        f"pyarrow>={pyarrow.__version__}",
        f"mlflow>={mlflow.__version__}",
        "pandas",
        "numpy",
    ]


class _Progress:
    """A click progress bar per epoch with the live loss; silent when disabled."""

    def __init__(self, enabled: bool, rows_per_epoch: int, echo: Callable[[str], None]):
        self.enabled, self.rows, self.echo = enabled, rows_per_epoch, echo
        self.bar, self.epoch, self.loss = None, 0, float("nan")

    def step(self, rows: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(
                length=self.rows,
                label=f"epoch {self.epoch:3d}",
                file=sys.stderr,
                item_show_func=lambda _: f"loss {self.loss:9.4f}",
                show_eta=True,
            )
            self.bar.__enter__()
        self.loss = loss
        self.bar.update(rows)

    def end_epoch(self, stats: EpochStats) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        self.epoch = stats.epoch + 1
        self.echo(
            f"epoch {stats.epoch:3d}  train loss {stats.train_loss:9.4f}  val elbo "
            f"{stats.val_elbo:9.4f}  val iwae {stats.val_iwae:9.4f}  active units "
            f"{stats.active_units}  ({stats.seconds:.1f}s)"
        )


def run(job: TrainJob, echo: Callable[[str], None] = print) -> TrainOutcome:
    started = time.perf_counter()
    registry.check_reachable(job.tracking_uri)  # fail before reading any data, not after
    source = ParquetSource(job.data)
    for what, names in (
        ("--exclude", job.exclude),
        ("--features", job.features or ()),
        ("--categorical", job.categorical),
        ("--continuous", job.continuous),
        ("--id-column", [job.id_column] if job.id_column else []),
    ):
        source.check_columns(names, what)
    fingerprint = source.fingerprint()
    echo(
        f"data: {len(fingerprint.files)} file(s), {fingerprint.rows:,} rows, "
        f"{fingerprint.total_bytes / 2**20:.1f} MiB (fingerprint {fingerprint.digest})"
    )
    exclude = [*job.exclude, *([job.id_column] if job.id_column else [])]
    features = None if job.features is None else [f for f in job.features if f != job.id_column]
    spec = FeatureSpec.fit(
        (batch for _, batch in source.batches()),
        exclude=exclude,
        features=features,
        categorical=job.categorical,
        continuous=job.continuous,
        max_categories=job.max_categories,
        min_category_count=job.min_category_count,
    )
    echo("features: " + ", ".join(f"{f.name} ({f.kind.value})" for f in spec.features))
    config = job.train
    data = TrainingData.from_parquet(
        source,
        spec,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        max_validation_rows=job.max_validation_rows,
        cache_bytes=job.cache_bytes,
    )
    counts = data.counts
    echo(
        f"rows: {counts.rows_train:,} train, {counts.rows_held_out:,} held out "
        f"({counts.rows_validation:,} kept for validation), {counts.rows_unusable:,} unusable; "
        f"{'cached in memory' if data.cached else 'streamed from Parquet each epoch'}"
    )
    device = resolve_device(config.device)
    echo(f"device: {device}")
    vae_config = VAEConfig.for_spec(spec, latent_dim=job.latent_dim, hidden=list(job.hidden))
    model = VAE(vae_config)

    # an explicit run name: MLflow's generated names come from the global `random` state, which
    # a seeded process repeats (every run of a benchmark was "overjoyed-slug-911")
    run_name = f"{job.model_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}"
    with registry.TrainingRun(
        job.tracking_uri, job.experiment, artifact_location=job.artifact_location, run_name=run_name
    ) as mlrun:
        params = {
            **{f"train.{k}": v for k, v in config.to_json().items()},
            **{f"vae.{k}": v for k, v in vae_config.to_json().items()},
            "score.k": job.k,
            "score.samples": job.samples,
            "score.seed": job.score_seed,
            "threshold_quantile": job.threshold_quantile,
            "features.count": len(spec.features),
            "features.names": ",".join(spec.names()),
            "features.max_categories": job.max_categories,
            "features.min_category_count": job.min_category_count,
            "id_column": job.id_column or "",
            "data.location": job.data,
            "data.files": len(fingerprint.files),
            "data.bytes": fingerprint.total_bytes,
            "data.rows": fingerprint.rows,
            "data.digest": fingerprint.digest,
            **{f"rows.{k}": v for k, v in counts.to_json().items()},
            "device": str(device),
        }
        mlrun.log_params(params)
        progress = _Progress(
            job.progress, counts.rows_train * job.train.passes_per_epoch(counts.rows_train), echo
        )

        def on_epoch(stats: EpochStats) -> None:
            progress.end_epoch(stats)
            metrics = {
                "train_loss": stats.train_loss,
                "train_elbo": stats.train_elbo,
                "val_elbo": stats.val_elbo,
                "val_iwae": stats.val_iwae,
                "val_criterion": stats.val_criterion,
                "active_units": stats.active_units,
                "epoch_seconds": stats.seconds,
            }
            metrics.update({f"kl_dim_{u}": v for u, v in enumerate(stats.kl_per_dim)})
            mlrun.log_metrics(metrics, step=stats.epoch)

        result = train(model, data, config=config, on_epoch=on_epoch, on_step=progress.step)
        echo(f"trained {len(result.history)} epochs; best epoch {result.best_epoch}")

        # Calibration: the validation sample scored exactly as production will score it.
        scores = _score_in_chunks(model, data, spec, job, device)
        calibration = Calibration.fit(
            scores["anomaly_score"], scores["feature_nll"], job.threshold_quantile
        )
        threshold = calibration.threshold()
        echo(
            f"calibration: {calibration.rows:,} validation rows, IWAE K={job.k}; threshold "
            f"{threshold:.3f} nats at quantile {job.threshold_quantile}"
        )
        mlrun.log_metrics(
            {
                "best_epoch": result.best_epoch,
                "calibration_threshold": threshold,
                "calibration_median_score": calibration.threshold(0.5),
                "calibration_rows": calibration.rows,
            }
        )
        best = result.history[result.best_epoch]
        artifact = ModelArtifact.from_model(
            model,
            spec,
            calibration,
            scoring=ScoringDefaults(k=job.k, samples=job.samples, seed=job.score_seed),
            id_column=job.id_column,
            metadata={
                "model_name": job.model_name,
                "model_label": f"{job.model_name}/run-{mlrun.run_id[:12]}",
                "run_id": mlrun.run_id,
                "vaewatch_version": package_version(),
                "torch_version": torch.__version__,
                "trained_on": str(device),
                "train_config": config.to_json(),
                "best_epoch": result.best_epoch,
                "best_val_elbo": best.val_elbo,
                "best_val_iwae": best.val_iwae,
                "epochs_run": len(result.history),
                "rows": counts.to_json(),
                "data_fingerprint": fingerprint.to_json(),
            },
        )
        with tempfile.TemporaryDirectory(prefix="vaewatch-train-") as tmp:
            tmp = Path(tmp)
            (tmp / "config.json").write_text(
                json.dumps(artifact.config_json(), indent=2, sort_keys=True) + "\n"
            )
            (tmp / "history.json").write_text(
                json.dumps([h.to_json() for h in result.history], indent=2) + "\n"
            )
            (tmp / "data_fingerprint.json").write_text(
                json.dumps(fingerprint.to_json(), indent=2) + "\n"
            )
            mlrun.log_files(
                {
                    "": tmp / "config.json",
                    "diagnostics": tmp / "history.json",
                    "data": tmp / "data_fingerprint.json",
                    "plots": plots.loss_curves(
                        result.history, result.best_epoch, tmp / "loss_curves.png"
                    ),
                }
            )
            mlrun.log_files(
                {
                    "plots": plots.score_histogram(
                        scores["anomaly_score"],
                        threshold,
                        job.threshold_quantile,
                        tmp / "score_histogram.png",
                        f"{job.model_name}: validation anomaly scores",
                    )
                }
            )
        resolved = mlrun.register(
            artifact,
            job.model_name,
            alias=job.alias,
            tags={
                "data_fingerprint": fingerprint.digest,
                "data_rows": fingerprint.rows,
                "vaewatch_version": package_version(),
                "trained_on": str(device),
            },
            pip_requirements=_pip_requirements(),
        )
    echo(f"registered {resolved.uri} (alias @{job.alias}) in {time.perf_counter() - started:.0f}s")
    return TrainOutcome(
        resolved=resolved,
        artifact=artifact,
        model=model,
        history=result.history,
        best_epoch=result.best_epoch,
        calibration_scores=scores["anomaly_score"],
    )


def _score_in_chunks(model: VAE, data: TrainingData, spec: FeatureSpec, job: TrainJob, device):
    anomaly, nll = [], []
    log_std = spec.continuous_log_std.to(device)
    for start in range(0, data.x_val.shape[0], 65_536):
        x = data.x_val[start : start + 65_536].to(device)
        m = data.m_val[start : start + 65_536].to(device)
        s = score_records(
            model, x, m, log_std=log_std, k=job.k, samples=job.samples, seed=job.score_seed
        )
        anomaly.append(s.anomaly_score.cpu().numpy())
        nll.append(s.feature_nll.cpu().numpy())
    return {"anomaly_score": np.concatenate(anomaly), "feature_nll": np.concatenate(nll)}
