"""`vaewatch train`: `model.fit` wrapped in an MLflow run, then a registered model version.

The fitting itself (spec, network, calibration, artifact) is model/training/fit.py; this module logs
parameters, per-epoch metrics, plots and JSON to the run, and registers the artifact.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click

from vaewatch.jobs import plots
from vaewatch.model import defaults, registry
from vaewatch.model.training.fit import FitConfig, FitResult, Prepared, fit
from vaewatch.model.training.loop import EpochStats, TrainConfig
from vaewatch.model.training.sizing import profile_name
from vaewatch.model.version import package_version


@dataclass
class TrainJob:
    data: str
    model_name: str
    tracking_uri: str
    fit: FitConfig = field(default_factory=FitConfig)
    experiment: str = defaults.EXPERIMENT
    alias: str = defaults.ALIAS
    progress: bool = True
    artifact_location: str | None = None  # for a new experiment; None: MLflow's default


@dataclass
class TrainOutcome:
    resolved: registry.ResolvedModel
    fitted: FitResult

    @property
    def artifact(self):
        return self.fitted.artifact

    @property
    def model(self):
        return self.fitted.model

    @property
    def history(self):
        return self.fitted.history

    @property
    def calibration_scores(self):
        return self.fitted.calibration_scores


def _pip_requirements() -> list[str]:
    """What serving the model needs, pinned to this environment's versions (with `make venv`,
    the lock's): a serving host that installs the model's requirements.txt gets the set the
    model was trained and tested with. vaewatch's own code travels with the model (code_paths),
    so only published packages are listed. torch is pinned by version without its local label
    (+cpu, +cu126): the host installs the build that fits its hardware first."""
    from importlib.metadata import version

    return [
        f"{name}=={version(name).split('+')[0]}"
        for name in ("torch", "safetensors", "pyarrow", "mlflow", "pandas", "numpy")
    ]


class _Progress:
    """A click progress bar per epoch with the live loss; silent when disabled."""

    def __init__(self, enabled: bool, echo: Callable[[str], None], rows_per_epoch: int = 0):
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
    config = job.fit
    # an explicit run name: MLflow's generated names come from the global `random` state, which
    # a seeded process repeats (every run of a benchmark was "overjoyed-slug-911")
    run_name = f"{job.model_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}"
    with registry.TrainingRun(
        job.tracking_uri, job.experiment, artifact_location=job.artifact_location, run_name=run_name
    ) as mlrun:
        progress = _Progress(job.progress, echo)

        def on_prepared(prepared: Prepared) -> None:
            _describe(prepared, echo, job.fit.train)
            mlrun.log_params(_params(job, prepared))
            counts = prepared.counts
            progress.rows = counts.rows_train * config.train.passes_per_epoch(counts.rows_train)

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

        fitted = fit(
            job.data, config, on_prepared=on_prepared, on_epoch=on_epoch, on_step=progress.step
        )
        artifact, calibration = fitted.artifact, fitted.artifact.calibration
        threshold = calibration.threshold()
        set_aside = artifact.metadata.get("robust")
        if set_aside is not None:
            trimmed = artifact.metadata["train_config"]["robust_trim"]
            echo(_set_aside_line(set_aside, fitted.prepared.counts.rows_train, trimmed))
            mlrun.log_metrics(
                {
                    "robust_set_aside_rows": set_aside["rows"],
                    "robust_set_aside_share": set_aside["share"],
                    "robust_cutoff": set_aside["cutoff"],
                    "refit_epochs": set_aside["refit_epochs"],
                    "refit_chosen": int(set_aside["chosen"]),
                }
            )
        if fitted.best_epoch >= 0:
            echo(f"trained {len(fitted.history)} epochs; best epoch {fitted.best_epoch}")
        else:  # early stopping chooses no epoch of the KL warm-up (model/training/loop.py)
            echo(
                f"trained {len(fitted.history)} epochs, all inside the "
                f"{config.train.kl_warmup_epochs}-epoch KL warm-up: none was chosen, the last "
                "one's weights are kept (more epochs than the warm-up let early stopping choose)"
            )
        echo(
            f"calibration: {calibration.rows:,} validation rows, IWAE K={artifact.scoring.k}"
            + _k_choice(artifact.metadata.get("k_errors"), artifact.scoring.k)
            + " "
            f"({artifact.scoring.points} points), proposal scale "
            f"{artifact.scoring.proposal_scale:g}; "
            f"threshold {threshold:.3f} nats at quantile {config.threshold_quantile}, flag rule "
            f"{calibration.effective_rule}"
            + (" (with -log p(discrete | continuous))" if calibration.conditional_term else "")
            + _set_aside(calibration, config.threshold_quantile)
            + (
                f"; -log p(discrete | continuous) counts {calibration.discrete_weight:.3g}x in "
                "anomaly_score"
                if calibration.discrete_weight != 1.0
                else ""
            )
        )
        _warn_if_few_above(calibration.rows, config.threshold_quantile)
        if artifact.segments is not None:
            echo(_segments_line(artifact))
        mlrun.log_metrics(
            {
                "best_epoch": fitted.best_epoch,
                # the registered weights' (val_iwae is each epoch's), as fit records them
                "epochs_run": artifact.metadata["epochs_run"],
                "best_val_iwae": artifact.metadata["best_val_iwae"],
                "calibration_threshold": threshold,
                "calibration_median_score": calibration.score_quantile(0.5),
                "calibration_rows": calibration.rows,
                "calibration_outliers": calibration.surprise_outliers,
                "calibration_flagged_share": calibration.flagged_share(),
                "calibration_discrete_weight": calibration.discrete_weight,
                "proposal_scale": artifact.scoring.proposal_scale,
                "score_k": artifact.scoring.k,
            }
        )
        artifact.metadata.update(
            model_name=job.model_name,
            model_label=f"{job.model_name}/run-{mlrun.run_id[:12]}",
            run_id=mlrun.run_id,
        )
        _log_files(mlrun, job, fitted, threshold)
        fingerprint = fitted.prepared.fingerprint
        resolved = mlrun.register(
            artifact,
            job.model_name,
            alias=job.alias,
            tags={
                "data_fingerprint": fingerprint.digest,
                "data_rows": fingerprint.rows,
                "vaewatch_version": package_version(),
                "trained_on": str(fitted.prepared.device),
            },
            pip_requirements=_pip_requirements(),
        )
    echo(
        f"registered {resolved.uri} (alias @{job.alias}) in {time.perf_counter() - started:.0f}s; "
        + mlrun.where
    )
    return TrainOutcome(resolved=resolved, fitted=fitted)


# fewer calibration rows than this above the threshold quantile: the threshold is rough
MIN_ROWS_ABOVE_THRESHOLD = 10


def _warn_if_few_above(rows: int, quantile: float) -> bool:
    """Warn (also under -q) when the threshold is a quantile of so few validation rows that
    fewer than MIN_ROWS_ABOVE_THRESHOLD lie above it: the share a new day flags then depends
    on which rows were held out. True when it warned."""
    above = round(rows * (1.0 - quantile), 9)  # 100 x (1 - 0.9) is 9.999999999999998
    if above >= MIN_ROWS_ABOVE_THRESHOLD:
        return False
    logging.getLogger(__name__).warning(
        "the flag threshold, quantile %s of %s validation rows, has %.3g of them above it: the "
        "share of records a new day flags will be rough, and so is the drift check's expected "
        "rate. %s validation rows give it %d; train on more rows, or raise "
        "--validation-fraction or lower --threshold-quantile",
        f"{quantile:g}", f"{rows:,}", above,
        f"{round(MIN_ROWS_ABOVE_THRESHOLD / (1.0 - quantile)):,}", MIN_ROWS_ABOVE_THRESHOLD,
    )  # fmt: skip
    return True


def _set_aside(calibration, quantile: float) -> str:
    """The end of `vaewatch train`'s calibration line where the "any" rule leaves some of its
    calibration rows out of the 1 - q it flags (Calibration.set_aside); "" elsewhere."""
    if calibration.effective_rule != "any" or calibration.surprise_outliers == 0:
        return ""
    share, rows = calibration.set_aside(quantile), calibration.rows
    aside, outlying = round(share * rows), round(calibration.surprise_outliers * rows)
    count = f"{aside:,}" if aside == outlying else f"{aside:,} of {outlying:,} (the bound)"
    flagged = f"{1 - quantile:.3g}"
    return f"; {count} outlying calibration rows ({share:.2%}) set aside from the 1 - q = {flagged}"


def _describe(prepared: Prepared, echo: Callable[[str], None], train: TrainConfig) -> None:
    fingerprint, counts = prepared.fingerprint, prepared.counts
    echo(
        f"data: {len(fingerprint.files)} file(s), {fingerprint.rows:,} rows, "
        f"{fingerprint.total_bytes / 2**20:.1f} MiB (fingerprint {fingerprint.digest})"
    )
    echo("features: " + ", ".join(f"{f.name} ({f.kind.value})" for f in prepared.spec.features))
    if prepared.unused:
        echo(
            "not used (types vaewatch does not model; --exclude them to silence this, or derive "
            "numeric or string columns from them): "
            + ", ".join(f"{name} ({arrow_type})" for name, arrow_type in prepared.unused)
        )
    echo(
        f"rows: {counts.rows_train:,} train, {counts.rows_held_out:,} held out "
        f"({counts.rows_validation:,} kept for validation), {counts.rows_unusable:,} unusable; "
        f"{'cached in memory' if prepared.cached else 'streamed from Parquet each epoch'}"
    )
    vae, rows = prepared.vae_config, counts.rows_train
    run = train.for_rows(rows)
    size = profile_name(rows, train.profile)
    when = "from the start" if run.trim_from_start else "after the warm-up"
    trim = f"the worst {run.robust_trim:.0%} of each batch"
    if run.trim_weight > 0:
        trim += f" at weight {run.trim_weight:g} {when}, the worst {run.robust_drop:.0%} left out"
        trim += " after the warm-up"
    else:
        trim += f" left out {when}"
    if run.refit:
        trim += (
            f", then a refit of the plain likelihood without the rows beyond "
            f"{run.refit_fence:g} interquartile ranges of the robust fit's upper quartile"
            if run.robust_trim
            else ", then a fine-tune at a tenth of the learning rate"
        )
    echo(
        f"network: {'x'.join(map(str, vae.hidden))} units, {vae.latent_dim} latent dimensions; "
        f"robust training ({size}-table profile unless given): {trim}, weight prior "
        f"{run.weight_prior:g}"
    )
    echo(f"device: {prepared.device}")


def _k_choice(errors: dict | None, k: int) -> str:
    """How K was chosen (model/estimation/proposal.py `choose_k`): each K tried, its error."""
    if not errors:
        return ""
    tried = ", ".join(f"K={key} {value:+.3f}" for key, value in errors.items())
    return (
        f" (chosen: mean error against K={defaults.K_REFERENCE:,} on the validation rows "
        f"{tried}; budget {defaults.K_BUDGET:g} nats)"
    )


def _set_aside_line(set_aside: dict, rows: int, trimmed: float) -> str:
    """What the refit left out, and whether it was kept (model/training/loop.py `SetAside`)."""
    kept = "kept" if set_aside["chosen"] else "not kept: the first stage validated better"
    if not trimmed:
        epochs = set_aside["refit_epochs"]
        return f"refit: every row, at a tenth of the learning rate; {epochs} epochs, {kept}"
    return (
        f"refit: {set_aside['rows']:,} of {rows:,} training rows ({set_aside['share']:.2%}) set "
        f"aside, -IWAE above {set_aside['cutoff']:.2f} nats (standardised units: upper quartile "
        f"{set_aside['quartiles'][1]:.2f} + {set_aside['fence']:g} x interquartile range under "
        f"the robust fit); {set_aside['refit_epochs']} epochs, {kept}"
    )


def _params(job: TrainJob, prepared: Prepared) -> dict:
    config, fingerprint, spec = job.fit, prepared.fingerprint, prepared.spec
    counts = prepared.counts
    return {
        # the training config as run: robust-training fields left unset take the profile for
        # the table's size (model/training/sizing.py)
        **{f"train.{k}": v for k, v in config.train.for_rows(counts.rows_train).to_json().items()},
        **{f"vae.{k}": v for k, v in prepared.vae_config.to_json().items()},
        # "auto": chosen after training (model/estimation/proposal.py), logged as score_k
        "score.k": config.scoring.k if config.k_budget is None else "auto",
        "score.seed": config.scoring.seed,
        "score.points": config.scoring.points,
        "threshold_quantile": config.threshold_quantile,
        "flag_rule": config.flag_rule,
        "segment_column": config.segment_column or "",
        "features.count": len(spec.features),
        "features.names": ",".join(spec.names()),
        "features.max_categories": config.max_categories,
        "features.min_category_count": config.min_category_count,
        "features.min_category_share": config.min_category_share,
        "features.zero_inflated": ",".join(f.name for f in spec.features if f.zero_atom),
        "missingness": config.missingness,
        "id_column": config.id_column or "",
        "data.location": job.data,
        "data.files": len(fingerprint.files),
        "data.bytes": fingerprint.total_bytes,
        "data.rows": fingerprint.rows,
        "data.digest": fingerprint.digest,
        **{f"rows.{k}": v for k, v in counts.to_json().items()},
        "device": str(prepared.device),
    }


def _log_files(mlrun: registry.TrainingRun, job: TrainJob, fitted: FitResult, threshold) -> None:
    artifact = fitted.artifact
    with tempfile.TemporaryDirectory(prefix="vaewatch-train-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(
            json.dumps(artifact.config_json(), indent=2, sort_keys=True) + "\n"
        )
        (tmp / "history.json").write_text(
            json.dumps([h.to_json() for h in fitted.history], indent=2) + "\n"
        )
        (tmp / "data_fingerprint.json").write_text(
            json.dumps(fitted.prepared.fingerprint.to_json(), indent=2) + "\n"
        )
        mlrun.log_files(
            {
                "": tmp / "config.json",
                "diagnostics": tmp / "history.json",
                "data": tmp / "data_fingerprint.json",
                "plots": plots.loss_curves(
                    fitted.history, fitted.best_epoch, tmp / "loss_curves.png"
                ),
            }
        )
        mlrun.log_files(
            {
                "plots": plots.score_histogram(
                    fitted.calibration_scores,
                    threshold,
                    job.fit.threshold_quantile,
                    tmp / "score_histogram.png",
                    f"{job.model_name}: validation anomaly scores",
                )
            }
        )


def _segments_line(artifact) -> str:
    """What `train` says of per-segment baselines: which values got one, with their
    thresholds, and which are judged by the global baseline."""
    segments, quantile = artifact.segments, artifact.calibration.threshold_quantile
    own = ", ".join(
        f"{value} ({baseline.rows:,} rows, threshold {baseline.threshold(quantile):.2f})"
        for value, baseline in artifact.calibrations().items()
    )
    small = ", ".join(f"{value} ({rows})" for value, rows in segments.small.items())
    return (
        f"segments of {segments.column!r}: {len(segments.values)} with a baseline of their own "
        f"(at least {segments.min_rows:,} validation rows): {own or 'none'}; judged by the "
        f"global baseline: {small or 'no other value'} with too few rows, nulls, and values "
        "not in the model's vocabulary"
    )
