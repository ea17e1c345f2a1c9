"""Fitting a model artifact from Parquet: feature spec -> VAE -> calibration -> `ModelArtifact`.

`fit(source, FitConfig())` is the whole of it, with no MLflow and no CLI: the `train` command
wraps it with run logging and registration, tests and benchmarks call it directly.

Calibration scores the held-out validation sample exactly as production will score it (the
same estimator, K and seed), so `score_percentile` and `is_anomaly` mean the same thing at
training and at scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch

from vaewatch.model import defaults
from vaewatch.model.artifact import ModelArtifact, ScoringDefaults
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.calibration.segments import check_column, fit_segments
from vaewatch.model.data.columns import FeatureKind, SchemaMismatchError, accepts, choose_columns
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.data.inputs import Fingerprint, ParquetSource
from vaewatch.model.data.training_data import DataCounts, TrainingData
from vaewatch.model.device import resolve_device
from vaewatch.model.errors import setting
from vaewatch.model.estimation.attribution import (
    conditional_baseline,
    explain_flagged,
    missing_baseline,
    top_indices,
)
from vaewatch.model.estimation.estimators import DEFAULT_MEMORY_BUDGET, score_records
from vaewatch.model.estimation.proposal import choose_k, choose_proposal_scale
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.training.loop import (
    EpochStats,
    TrainConfig,
    train,
)
from vaewatch.model.training.sizing import capacity
from vaewatch.model.version import package_version

CALIBRATION_CHUNK_ROWS = 65_536  # validation rows scored per call when calibrating
CONDITIONAL_BASELINE_ROWS = 512  # validation rows the leave-one-out baseline is a median over


@dataclass
class FitConfig:
    """Everything `fit` needs besides the data. Defaults are the CLI's defaults."""

    id_column: str | None = None  # kept in outputs, never a feature
    exclude: Sequence[str] = ()  # columns that are not features
    features: Sequence[str] | None = None  # only these features (None: every usable column)
    categorical: Sequence[str] = ()  # integer columns to model as categories
    continuous: Sequence[str] = ()  # columns that must be numeric
    max_categories: int = defaults.MAX_CATEGORIES
    min_category_count: int = defaults.MIN_CATEGORY_COUNT
    min_category_share: float = defaults.MIN_CATEGORY_SHARE
    latent_dim: int | None = None  # None: scaled to the training rows (`capacity`)
    hidden: Sequence[int] | None = None  # None: scaled to the training rows (`capacity`)
    missingness: str = defaults.MISSINGNESS  # "model" or "marginal" (VAEConfig.for_spec)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringDefaults = field(
        default_factory=ScoringDefaults
    )  # K, seed and points at scoring
    # K chosen per model (model/estimation/proposal.py `choose_k`) within this many nats of
    # K_REFERENCE's table mean; None: scoring.k as given
    k_budget: float | None = defaults.K_BUDGET
    threshold_quantile: float = defaults.THRESHOLD_QUANTILE
    flag_rule: str = defaults.FLAG_RULE  # is_anomaly's rule (model/calibration/scores.py)
    max_validation_rows: int = defaults.MAX_VALIDATION_ROWS
    cache_bytes: int = defaults.CACHE_BYTES
    # a categorical feature whose values each get a baseline of their own
    # (model/calibration/segments.py); None: one global baseline
    segment_column: str | None = None

    def checked_columns(self) -> list[tuple[str, Sequence[str]]]:
        """(setting, columns) pairs that must exist in the data."""
        return [
            (setting("exclude"), self.exclude),
            (setting("features"), self.features or ()),
            (setting("categorical"), self.categorical),
            (setting("continuous"), self.continuous),
            (setting("id_column"), [self.id_column] if self.id_column else []),
            (setting("segment_column"), [self.segment_column] if self.segment_column else []),
        ]


@dataclass
class Prepared:
    """The data side of a fit, known before the first epoch (for logging)."""

    fingerprint: Fingerprint
    spec: FeatureSpec
    counts: DataCounts
    cached: bool  # training rows held in memory (else streamed from Parquet every epoch)
    vae_config: VAEConfig
    device: torch.device
    # (name, Arrow type) of the data's columns that are neither features nor excluded: types
    # vaewatch does not model (timestamps, dates, binary, nested), skipped unless asked for
    unused: tuple[tuple[str, str], ...] = ()


@dataclass
class FitResult:
    artifact: ModelArtifact
    model: VAE  # the trained network, in eval mode, on the training device
    history: list[EpochStats]
    best_epoch: int
    calibration_scores: np.ndarray  # anomaly scores of the calibration rows
    prepared: Prepared


def fit(
    source: ParquetSource | str | Sequence[str],
    config: FitConfig | None = None,
    *,
    on_prepared: Callable[[Prepared], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fit a feature spec and a VAE on `source`, calibrate on the held-out rows, and return
    the artifact (`metadata` holds the training record; callers add names and run ids)."""
    config = config or FitConfig()
    source = source if isinstance(source, ParquetSource) else ParquetSource(source)
    for what, names in config.checked_columns():
        source.check_columns(names, what)
    fingerprint = source.fingerprint()
    id_column = config.id_column
    exclude = [*config.exclude, *([id_column] if id_column else [])]
    features = None if config.features is None else [f for f in config.features if f != id_column]
    schema = training_schema(source)
    check_files(
        source,
        schema,
        choose_columns(
            schema,
            exclude=exclude,
            features=features,
            categorical=config.categorical,
            continuous=config.continuous,
        ),
    )
    spec = FeatureSpec.fit(
        (batch for _, batch in source.batches()),
        exclude=exclude,
        features=features,
        categorical=config.categorical,
        continuous=config.continuous,
        max_categories=config.max_categories,
        min_category_count=config.min_category_count,
        min_category_share=config.min_category_share,
        schema=schema,
    )
    train_config = config.train
    data = TrainingData.from_parquet(
        source,
        spec,
        validation_fraction=train_config.validation_fraction,
        seed=train_config.seed,
        max_validation_rows=config.max_validation_rows,
        cache_bytes=config.cache_bytes,
    )
    train_config = train_config.for_rows(data.counts.rows_train)  # the size's training profile
    device = resolve_device(train_config.device)
    latent_dim, hidden = capacity(data.counts.rows_train)
    vae_config = VAEConfig.for_spec(
        spec,
        missingness=config.missingness,
        latent_dim=latent_dim if config.latent_dim is None else config.latent_dim,
        hidden=list(hidden if config.hidden is None else config.hidden),
    )
    unused = ()
    if config.features is None:  # every column was a candidate: name the ones skipped
        used = {*spec.names(), *exclude}
        unused = tuple((f.name, str(f.type)) for f in schema if f.name not in used)
    if config.segment_column:  # before the first epoch: a wrong column fails fast
        check_column(spec, config.segment_column)
    prepared = Prepared(fingerprint, spec, data.counts, data.cached, vae_config, device, unused)
    if on_prepared is not None:
        on_prepared(prepared)

    model = VAE(vae_config)
    result = train(model, data, config=train_config, on_epoch=on_epoch, on_step=on_step)
    scoring = replace(
        config.scoring,
        proposal_scale=choose_proposal_scale(
            model, data, spec, config.scoring, device, train_config.validation_trim
        ),
    )
    k_errors = None
    if config.k_budget is not None:
        k, k_errors = choose_k(
            model, data, spec, scoring, device, config.k_budget, train_config.validation_trim
        )
        scoring = replace(scoring, k=k)
    log_likelihood, feature_nll, discrete_nll = calibration_scores(
        model, data, spec, scoring, device
    )
    missing = ~data.m_val.cpu().numpy()
    calibration = Calibration.fit(
        -log_likelihood,
        feature_nll,
        config.threshold_quantile,
        config.scoring.top_features,
        missing=missing,
        flag_rule=config.flag_rule,
        discrete_nll=discrete_nll,
    )
    scores = calibration.complete(log_likelihood, missing, discrete_nll)
    calibration, named = with_conditional_attribution(
        calibration, model, data, (scores, feature_nll, discrete_nll), scoring, spec, device
    )
    segments = None
    if config.segment_column:
        j = spec.names().index(config.segment_column)
        terms = feature_nll
        if calibration.conditional_term:
            terms = np.column_stack([feature_nll, discrete_nll])
        segments = fit_segments(
            calibration, spec, config.segment_column,
            codes=data.x_val[:, j].cpu().numpy().astype(np.int64),
            observed=data.m_val[:, j].cpu().numpy(),
            scores=scores, terms=terms, named=named,
        )  # fmt: skip
    best = result.history[result.best_epoch]
    artifact = ModelArtifact.from_model(
        model,
        spec,
        calibration,
        scoring=scoring,
        id_column=id_column,
        segments=segments,
        metadata={
            "vaewatch_version": package_version(),
            "torch_version": torch.__version__,
            "trained_on": str(device),
            "train_config": train_config.to_json(),
            "best_epoch": result.best_epoch,
            "best_val_elbo": best.val_elbo,
            "best_val_iwae": best.val_iwae,
            "epochs_run": len(result.history),
            "rows": data.counts.to_json(),
            "data_fingerprint": fingerprint.to_json(),
            # the training rows the refit left out (model/training/loop.py `SetAside`)
            "robust": result.set_aside.to_json() if result.set_aside is not None else None,
            # each K tried by `choose_k` -> its validation error against K_REFERENCE, nats
            "k_errors": None if k_errors is None else {str(k): e for k, e in k_errors.items()},
        },
    )
    return FitResult(
        artifact=artifact,
        model=model,
        history=result.history,
        best_epoch=result.best_epoch,
        calibration_scores=scores,
        prepared=prepared,
    )


def training_schema(source: ParquetSource) -> pa.Schema:
    """The first file's schema (from the footers, no data read), where a column Arrow types as
    null there (no value in that file: pandas writes an all-None column so) takes its type from
    the first file that has one."""
    schemas = source.file_schemas()
    fields = []
    for column in schemas[0]:
        if pa.types.is_null(column.type):
            typed = (s.field(column.name) for s in schemas[1:] if column.name in s.names)
            column = next((f for f in typed if not pa.types.is_null(f.type)), column)
        fields.append(column)
    return pa.schema(fields)


def check_files(
    source: ParquetSource, reference: pa.Schema, chosen: Sequence[tuple[str, FeatureKind]]
) -> None:
    """Every training file must have the features chosen from `reference` (training_schema),
    with a type of the same kind, before a row is read: a feature missing from a later file
    would otherwise surface mid-fit, and a column only later files have is named, as it is not
    used."""
    schemas = source.file_schemas()
    first = source.files[0].path
    later: dict[str, list[str]] = {}
    for file, schema in zip(source.files[1:], schemas[1:], strict=True):
        lacking = [name for name, _ in chosen if name not in schema.names]
        if lacking:
            raise SchemaMismatchError(
                f"training file {file.path!r} has no column(s) {lacking}, which the first file "
                f"({first!r}) has and training uses as features. Add them to every file (null "
                "where unknown: modelled as missing), or leave them out "
                f"({setting('exclude', ','.join(lacking))})"
            )
        for name, kind in chosen:
            found = schema.field(name).type
            if not accepts(kind, found):
                raise SchemaMismatchError(
                    f"column {name!r} is {reference.field(name).type} (read as {kind.value}) "
                    f"in the first training file with values for it, but {found} in "
                    f"{file.path!r}. Cast it to one type in every file, or leave it out "
                    f"({setting('exclude', name)})"
                )
        for name in schema.names:
            if name not in reference.names:
                later.setdefault(name, []).append(file.path)
    if later:
        named = "; ".join(
            f"{name!r} ({len(paths)} file(s), from {paths[0]!r})" for name, paths in later.items()
        )
        logging.getLogger(__name__).warning(
            "column(s) in later training files but not the first (%r) are not used: %s. The "
            "columns come from the first file; to use them, add them to every file (null where "
            "unknown)",
            first,
            named,
        )


def with_conditional_attribution(
    calibration: Calibration,
    model: VAE,
    data: TrainingData,
    scored: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    scoring: ScoringDefaults,
    spec: FeatureSpec,
    device,
) -> Calibration:
    """The flagged records' attribution (model/estimation/attribution.py): its baseline, each
    feature's
    median -log p(x_j | x_-j) over the first CONDITIONAL_BASELINE_ROWS validation rows, and the
    drift check's reference shares of top_features, recomputed as scoring names them; and
    (n, F) bool, which features each validation row's top_features names.
    `scored`: the validation rows' anomaly scores, -log p(x_j|z) and -log p(x_d|x_c)."""
    scores, feature_nll, discrete_nll = scored
    estimator = dict(
        k=scoring.k,
        seed=scoring.seed,
        log_std=spec.continuous_log_std.to(device),
        proposal_scale=scoring.proposal_scale,
        memory_budget=DEFAULT_MEMORY_BUDGET,
        points=scoring.points,
    )
    x, mask = data.x_val.to(device), data.m_val.to(device)
    n = CONDITIONAL_BASELINE_ROWS
    baseline = conditional_baseline(model, x[:n], mask[:n], **estimator)
    flagged = calibration.flags(scores, feature_nll, discrete_nll=discrete_nll)
    excess = explain_flagged(
        model,
        x,
        mask,
        feature_nll - np.asarray(calibration.feature_baseline),
        flagged,
        baseline,
        scores,
        missing_baseline([f.missing_share for f in spec.features]),
        **estimator,
    ).excess
    top, _, keep = top_indices(excess, np.zeros(excess.shape[1]), calibration.top_feature_count)
    named = np.zeros(excess.shape, dtype=bool)
    np.put_along_axis(named, top, keep, axis=1)
    return replace(
        calibration,
        conditional_baseline=baseline.tolist(),
        top_feature_share=(named.sum(axis=0) / max(excess.shape[0], 1)).tolist(),
    ), named


def calibration_scores(
    model: VAE, data: TrainingData, spec: FeatureSpec, scoring: ScoringDefaults, device
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(log_likelihood, per-feature -log p(x_j|z), -log p(x_d|x_c) or None where the table
    lacks continuous or discrete features) of the validation rows, scored as in production."""
    anomaly, nll, discrete = [], [], []
    log_std = spec.continuous_log_std.to(device)
    for start in range(0, data.x_val.shape[0], CALIBRATION_CHUNK_ROWS):
        x = data.x_val[start : start + CALIBRATION_CHUNK_ROWS].to(device)
        m = data.m_val[start : start + CALIBRATION_CHUNK_ROWS].to(device)
        s = score_records(
            model, x, m, log_std=log_std, k=scoring.k, seed=scoring.seed,
            proposal_scale=scoring.proposal_scale, points=scoring.points,
        )  # fmt: skip
        anomaly.append(s.log_likelihood.cpu().numpy())
        nll.append(s.feature_nll.cpu().numpy())
        if s.discrete_nll is not None:
            discrete.append(s.discrete_nll.cpu().numpy())
    return (
        np.concatenate(anomaly),
        np.concatenate(nll),
        np.concatenate(discrete) if discrete else None,
    )
