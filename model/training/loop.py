"""Fitting a VAE: Adam on mini-batches, a seeded validation split, early stopping.

Objectives (per record, averaged only at the very end), both reductions of the estimator core
(model/estimation/estimators.py) with fresh noise per record:
- "elbo": reconstruction - beta * KL, with beta warmed up linearly from 0 to 1 and optional
  free bits (each latent dimension's KL counts at least `free_bits` nats, Kingma et al. 2016).
- "iwae": the K-sample importance-weighted bound (Burda et al. 2015); no warm-up, the bound is
  the objective.
Validation reports the plain ELBO (beta = 1, no free bits) and the IWAE with the production
estimator, so runs are comparable. Early stopping watches the validation IWAE (trimmed of its
worst 1 %), the score vaewatch reports, whatever the objective, and starts only once the KL
warm-up is over: no epoch with beta < 1 is chosen, and patience counts from there.
The data side (split, caching, streaming) is model/data/training_data.py.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from vaewatch.model import defaults
from vaewatch.model import threads as cpu_threads
from vaewatch.model.choices import Objective, TrainingProfile
from vaewatch.model.data.training_data import TrainingData
from vaewatch.model.device import resolve_device
from vaewatch.model.errors import setting
from vaewatch.model.estimation.estimators import UNBOUNDED
from vaewatch.model.estimation.estimators import elbo as elbo_estimate
from vaewatch.model.estimation.estimators import iwae as iwae_estimate
from vaewatch.model.network.vae import VAE, gaussian_kl_dims
from vaewatch.model.training.sizing import training_profile

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015: unit u is active if Cov_x(E_q[z_u]) > 0.01
VALIDATION_IWAE_ROWS = 10_000  # per-epoch IWAE on at most this many rows (~0.5 s at K=64, CPU)
REFIT_LR_FACTOR = 0.1  # the refit's learning rate, of the configured one
REFIT_EPOCHS = 20  # at most, in the refit stage (early stopping usually ends it within 10)


@dataclass
class TrainConfig:
    epochs: int = defaults.EPOCHS  # every default's reason is in model/defaults.py
    batch_size: int = defaults.BATCH_SIZE
    learning_rate: float = defaults.LEARNING_RATE
    weight_decay: float = defaults.WEIGHT_DECAY
    # a table-wide Gaussian prior on the weights; None (as for every robust-training field
    # below): the profile for the table's size (model/training/sizing.py `training_profile`)
    weight_prior: float | None = None
    objective: str = defaults.OBJECTIVE
    train_k: int = defaults.TRAIN_K
    kl_warmup_epochs: int = defaults.KL_WARMUP_EPOCHS
    free_bits: float = defaults.FREE_BITS
    validation_fraction: float = defaults.VALIDATION_FRACTION
    patience: int = defaults.PATIENCE
    min_steps_per_epoch: int = defaults.MIN_STEPS_PER_EPOCH
    min_delta: float = 1e-3  # nats/record that count as an improvement
    seed: int = defaults.SEED  # drives init, the split, shuffling and the training noise
    device: str = defaults.DEVICE
    mixed_precision: bool = defaults.MIXED_PRECISION
    threads: int | None = defaults.THREADS  # CPU threads; None: the cores this process may use
    validation_k: int = defaults.K  # IWAE samples for the per-epoch validation IWAE
    validation_trim: float = 0.01  # early stopping ignores the worst 1% of validation rows:
    # training data for anomaly detection is rarely clean, and the few anomalous rows get *less*
    # likely as the model fits normal data, so they dominate a plain mean (measured on the demo:
    # 0.5% contamination drove the mean validation ELBO from -12 to -47,000 nats while the
    # model improved on every normal row)
    # each batch's loss down-weights its worst-explained records (robust_mean; the share that
    # counts nothing is at most robust_trim)
    robust_trim: float | None = None
    trim_from_start: bool | None = None  # ... or from the first update
    trim_weight: float | None = None  # what a trimmed record's loss counts (0: nothing)
    robust_drop: float | None = None  # ... but the worst count nothing after the warm-up
    # after the robust fit, refit the plain likelihood without the rows it explains beyond the
    # far-out fence (`train`, `far_out_cutoff`)
    refit: bool | None = None
    refit_fence: float = defaults.REFIT_FENCE  # the fence's multiple of the interquartile range
    # which profile the fields left at None take: "auto" (by the training rows), "small", "large"
    profile: str = "auto"

    def __post_init__(self) -> None:
        TrainingProfile.check("profile", self.profile)
        Objective.check("objective", self.objective)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )
        for name in ("weight_decay", "weight_prior"):
            if getattr(self, name) is not None and getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.refit_fence > 0.0:
            raise ValueError(f"refit_fence must be > 0, got {self.refit_fence}")
        if self.trim_weight is not None and not 0.0 <= self.trim_weight <= 1.0:
            raise ValueError(f"trim_weight must be in [0, 1], got {self.trim_weight}")
        for name in ("validation_trim", "robust_trim", "robust_drop"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {value}")
        for name in (
            "epochs",
            "batch_size",
            "train_k",
            "validation_k",
            "patience",
            "min_steps_per_epoch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_json(self) -> dict:
        return asdict(self)

    def for_rows(self, train_rows: int) -> TrainConfig:
        """This config with every robust-training field left at None set from the profile for
        `train_rows` training rows (`profile`, model/training/sizing.py); values given explicitly
        stay."""
        profile = training_profile(train_rows, self.profile)
        given = {name: getattr(self, name) for name in profile}
        return replace(self, **{k: v for k, v in profile.items() if given[k] is None})

    def decay_per_record(self, train_rows: int) -> float:
        """The L2 coefficient of the per-record mean loss: `weight_decay` plus the prior's
        precision spread over the rows. The prior is N(0, 1/weight_prior) on every parameter, once
        for the whole table, so it is strong where a few dozen rows could be memorised and
        vanishes as the table grows (maximum a posteriori, not a per-record penalty)."""
        prior = self.for_rows(train_rows).weight_prior
        return self.weight_decay + prior / max(1, train_rows)

    def passes_per_epoch(self, train_rows: int) -> int:
        """How many passes over `train_rows` rows make one epoch (>= min_steps_per_epoch)."""
        steps_per_pass = max(1, -(-train_rows // self.batch_size))
        return max(1, -(-self.min_steps_per_epoch // steps_per_pass))


@dataclass
class EpochStats:
    epoch: int
    train_loss: float  # the objective's loss, nats/record (standardised units)
    train_elbo: float  # plain ELBO (beta = 1) of the training batches as they were seen
    val_elbo: float  # nats/record, standardised units
    val_iwae: float  # IWAE_K (K = validation_k) on up to VALIDATION_IWAE_ROWS validation rows
    val_criterion: float  # what early stopping maximises: the validation IWAE's trimmed mean
    kl_per_dim: list[float]  # mean KL of each latent dimension on validation
    active_units: int  # latent dims with Cov_x(E_q[z_u]) > ACTIVE_UNIT_THRESHOLD
    seconds: float
    refit: bool = False  # an epoch of the refit stage (plain likelihood on the kept rows)

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- the loop
def robust_mean(
    losses: torch.Tensor, trim: float, trim_weight: float = 0.0, drop: float = 0.0
) -> torch.Tensor:
    """Weighted mean of the per-record `losses`: the worst `drop` fraction of the batch counts
    nothing, the rest of its worst `trim` fraction counts `trim_weight` each, every other record
    1 (at least one record at full weight). The records a model of normal data explains worst
    get little or no gradient, so anomalies in the training data cannot pull the density
    towards themselves."""
    n = losses.shape[0]
    keep = max(1, n - int(trim * n)) if trim > 0.0 else n
    if keep == n:
        return losses.mean()
    if trim_weight <= 0.0:  # every trimmed record left out
        return losses.topk(keep, largest=False, sorted=False).values.mean()
    dropped = min(int(drop * n), n - keep)
    weights = torch.full_like(losses, trim_weight)
    order = losses.detach().argsort()
    weights[order[:keep]] = 1.0
    weights[order[n - dropped :]] = 0.0
    return (weights * losses).sum() / weights.sum()


def _loss(model: VAE, x, mask, config: TrainConfig, beta: float, generator, trim: float = 0.0):
    """(loss to minimise, plain ELBO per record detached), both per-record means; the loss
    down-weights the worst `trim` fraction of the batch (`robust_mean`)."""
    posterior = model.encoder(x, mask)
    d = model.config.latent_dim
    if config.objective == "iwae":
        eps = torch.randn((config.train_k, x.shape[0], d), generator=generator).to(x.device)
        bound = iwae_estimate(model, x, mask, eps=eps, memory_budget=UNBOUNDED, posterior=posterior)
        return (
            robust_mean(-bound.log_likelihood, trim, config.trim_weight, config.robust_drop),
            bound.elbo.detach().mean(),
        )
    eps = torch.randn((1, x.shape[0], d), generator=generator).to(x.device)
    reconstruction = elbo_estimate(
        model, x, mask, eps=eps, memory_budget=UNBOUNDED, posterior=posterior
    ).reconstruction
    kl_dims = gaussian_kl_dims(posterior)  # (B, D)
    plain = (reconstruction - kl_dims.sum(-1)).detach().mean()
    if config.free_bits > 0:
        kl_dims = torch.clamp(kl_dims.mean(0, keepdim=True), min=config.free_bits).expand_as(
            kl_dims
        )
    loss = robust_mean(
        -(reconstruction - beta * kl_dims.sum(-1)), trim, config.trim_weight, config.robust_drop
    )
    return loss, plain


def trimmed_mean(values: np.ndarray, trim: float) -> float:
    """Mean of `values` without the lowest `trim` fraction (at least one value kept)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    drop = min(int(trim * ordered.size), ordered.size - 1)
    return float(ordered[drop:].mean())


@dataclass
class _Validation:
    elbo: np.ndarray  # (n,) per record
    iwae: np.ndarray  # (min(n, VALIDATION_IWAE_ROWS),) per record
    kl_per_dim: list[float]
    active_units: int


@torch.no_grad()
def _validate(model: VAE, x, mask, k: int, seed: int) -> _Validation:
    """Validation metrics with independent noise per record (averages over records are then
    unbiased; the common noise used for scoring would make every record's error the same).
    The noise is re-drawn from `seed` each epoch, so epochs are compared on equal terms."""
    model.eval()
    n, d = x.shape[0], model.config.latent_dim
    generator = torch.Generator().manual_seed(seed + 7)
    elbos, iwaes, kl_dims, means = [], [], torch.zeros(d), []
    iwae_rows = min(n, VALIDATION_IWAE_ROWS)
    for start in range(0, n, 1024):
        xs, ms = x[start : start + 1024], mask[start : start + 1024]
        b = xs.shape[0]
        posterior = model.encoder(xs, ms)
        eps = torch.randn((1, b, d), generator=generator).to(xs.device)
        elbos.append(elbo_estimate(model, xs, ms, eps=eps, posterior=posterior).elbo.cpu())
        kl_dims += gaussian_kl_dims(posterior).sum(0).cpu()
        means.append(posterior.mean.double().cpu())
        if start < iwae_rows:
            eps_k = torch.randn((k, b, d), generator=generator).to(xs.device)
            bound = iwae_estimate(model, xs, ms, eps=eps_k, posterior=posterior)
            iwaes.append(bound.log_likelihood[: iwae_rows - start].double().cpu())
    mu = torch.cat(means)
    activity = mu.var(0, correction=0) if n > 1 else torch.zeros(d)
    model.train()
    return _Validation(
        elbo=torch.cat(elbos).numpy(),
        iwae=torch.cat(iwaes).numpy(),
        kl_per_dim=(kl_dims / n).tolist(),
        active_units=int((activity > ACTIVE_UNIT_THRESHOLD).sum()),
    )


@dataclass
class SetAside:
    """What the refit (`TrainConfig.refit`) left out: the training rows the robust fit explains
    beyond `cutoff`, Tukey's far-out fence on the validation rows' -IWAE under that fit."""

    rows: int  # training rows left out (streamed: in the refit's last epoch)
    share: float  # of the training rows
    cutoff: float  # -IWAE, nats/record in the model's standardised units
    quartiles: tuple[float, float]  # of the validation rows' -IWAE under the robust fit
    fence: float  # the cutoff's multiple of the interquartile range above the upper quartile
    refit_epochs: int  # epochs of plain likelihood on the kept rows
    chosen: bool  # the refit beat the robust fit on the validation criterion

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = -1
    device: str = "cpu"
    set_aside: SetAside | None = None  # None: no refit ran


def far_out_cutoff(scores: np.ndarray, fence: float) -> tuple[float, tuple[float, float]]:
    """(Q3 + fence x IQR, (Q1, Q3)) of `scores`: Tukey's far-out fence at fence = 3. The
    quartiles move little with up to a quarter of the rows anomalous, so the cutoff is set by
    the bulk. Where -log p is chi2_D / 2 + c (D Gaussian features, an exact fit) it leaves out
    0.9 % (D = 2) to under 0.1 % (D >= 12) of the rows; trained models' scores spread wider,
    and clean tables lose 0.1-1.1 % (measured: bench/clean_density.py, tests/model)."""
    q1, q3 = np.quantile(np.asarray(scores, np.float64), [0.25, 0.75])
    return float(q3 + fence * (q3 - q1)), (float(q1), float(q3))


def train(
    model: VAE,
    data: TrainingData | torch.Tensor,
    mask: torch.Tensor | None = None,
    config: TrainConfig | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fit `model` in place; it ends with the weights of the best validation epoch.

    `data` is a TrainingData, or an (x, mask) pair of tensors split here by the config's seed.
    `on_step(rows, loss)` is called after every update (a progress bar), `on_epoch` after each
    epoch's validation.

    With `config.refit` (the large-table profile) and a trim, training has two stages, the
    reweighting step of robust covariance estimators (Rousseeuw & Van Driessen's reweighted
    MCD): the robust fit as configured, then the plain likelihood on every training row except
    those the robust fit explains beyond a cutoff derived from the fit itself (`far_out_cutoff`),
    starting from the robust fit's weights. A clean table so loses only its far-out rows, not
    the worst `robust_trim` of every batch, and its density keeps its tails; the refit's
    weights are kept only where they beat the robust fit on the validation criterion.
    """
    config = config or TrainConfig()
    if isinstance(data, torch.Tensor):
        model.check_input(data, mask)
        data = TrainingData.from_tensors(data, mask, config.validation_fraction, config.seed)
    config = config.for_rows(data.counts.rows_train)
    device = resolve_device(config.device)
    if device.type == "cpu":
        cpu_threads.apply(config.threads or cpu_threads.threads_for(1))
    torch.manual_seed(config.seed)
    model.reset_parameters()
    model.to(device).train()
    run = _Run(model, data, config, device, on_epoch, on_step)
    for epoch in range(config.epochs):
        beta = min(1.0, (epoch + 1) / config.kl_warmup_epochs) if config.kl_warmup_epochs else 1.0
        # by default trimming starts once the warm-up is over; from the start, the rows an
        # unfitted model explains worst (those far from the bulk) never get a gradient, so a
        # cluster of anomalies larger than the trim is not learned during the warm-up either
        warm = epoch >= config.kl_warmup_epochs
        trim = config.robust_trim if config.trim_from_start or warm else 0.0
        # the records that count nothing (robust_drop) wait for the warm-up in any case: dropped
        # from the first update, they are a share of every table never learned (the digit
        # tables' hard cases), while after the warm-up they are what the model cannot explain
        step_config = config if warm or not config.robust_drop else replace(config, robust_drop=0.0)
        stats = run.epoch(data, step_config, beta, trim)
        if config.objective == "elbo" and epoch + 1 < config.kl_warmup_epochs:
            continue  # beta is still rising: no epoch of the KL warm-up is chosen or counted
        if run.stop_after(stats):
            break
    if config.refit and run.best_state is not None:
        run.result.set_aside = _refit(run, data)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.eval()
    return run.result


class _Run:
    """One training run's state: optimiser, noise, validation tensors, early stopping."""

    def __init__(self, model: VAE, data: TrainingData, config, device, on_epoch, on_step):
        self.model, self.config, self.device = model, config, device
        self.on_epoch, self.on_step = on_epoch, on_step
        self.autocast = device.type == "cuda" and config.mixed_precision
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.x_val, self.m_val = data.x_val.to(device), data.m_val.to(device)
        self.rows = data.counts.rows_train
        self.optimizer = self.new_optimizer()
        self.result = TrainResult(device=str(device))
        self.best, self.best_state, self.stale = -math.inf, None, 0

    def new_optimizer(self, lr_factor: float = 1.0) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.model.parameters(),
            lr=self.config.learning_rate * lr_factor,
            weight_decay=self.config.decay_per_record(self.rows),
        )

    def epoch(
        self, data: TrainingData, step_config: TrainConfig, beta: float, trim: float, **stage
    ) -> EpochStats:
        """One epoch of updates on `data`, then validation; the stats go to on_epoch."""
        config, device, model = self.config, self.device, self.model
        started = time.perf_counter()
        running, running_elbo, seen = 0.0, 0.0, 0
        passes = config.passes_per_epoch(self.rows)
        batches = (
            b for _ in range(passes) for b in data.batches(config.batch_size, self.generator)
        )
        for x, mask_b in batches:
            x, mask_b = x.to(device, non_blocking=True), mask_b.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, plain = _loss(model, x, mask_b, step_config, beta, self.generator, trim)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {len(self.result.history)}; "
                    f"lower {setting('learning_rate')} or check the data for extreme values"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_value = loss.item()
            running += loss_value * x.shape[0]
            running_elbo += plain.item() * x.shape[0]
            seen += x.shape[0]
            if self.on_step is not None:
                self.on_step(x.shape[0], loss_value)
        val = _validate(model, self.x_val, self.m_val, config.validation_k, config.seed)
        stats = EpochStats(
            epoch=len(self.result.history),
            train_loss=running / max(seen, 1),
            train_elbo=running_elbo / max(seen, 1),
            val_elbo=float(val.elbo.mean()),
            val_iwae=float(val.iwae.mean()),
            # the score vaewatch reports is the IWAE: stop on it whatever the objective
            val_criterion=trimmed_mean(val.iwae, config.validation_trim),
            kl_per_dim=val.kl_per_dim,
            active_units=val.active_units,
            seconds=time.perf_counter() - started,
            **stage,
        )
        self.result.history.append(stats)
        if self.on_epoch is not None:
            self.on_epoch(stats)
        return stats

    def stop_after(self, stats: EpochStats) -> bool:
        """Early stopping: keep the best epoch's weights; True once `patience` epochs in a row
        did not improve on it by min_delta."""
        if stats.val_criterion > self.best + self.config.min_delta:
            self.best, self.stale, self.result.best_epoch = stats.val_criterion, 0, stats.epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.config.patience


def _refit(run: _Run, data: TrainingData) -> SetAside:
    """The refit stage of `train`: from the robust fit's best weights, the plain likelihood
    (beta 1, no trim) on the training rows it explains within `far_out_cutoff`, at a tenth of
    the learning rate, with early stopping against the robust fit's best criterion, for at
    most REFIT_EPOCHS epochs."""
    config, model = run.config, run.model
    model.load_state_dict(run.best_state)
    robust = copy.deepcopy(model).eval()
    val = _validate(robust, run.x_val, run.m_val, config.validation_k, config.seed)
    cutoff, quartiles = far_out_cutoff(-val.iwae, config.refit_fence)
    generator = torch.Generator().manual_seed(config.seed + 11)
    d = model.config.latent_dim

    @torch.no_grad()
    def outlying(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, mask = x.to(run.device), mask.to(run.device)
        eps = torch.randn((config.validation_k, x.shape[0], d), generator=generator).to(x.device)
        return -iwae_estimate(robust, x, mask, eps=eps).log_likelihood > cutoff

    # without a trim the fit was the plain likelihood already: nothing is set aside, the
    # refit is the same fine-tune on every row (so --robust-trim 0 differs only in the trim)
    kept = data.excluding(outlying) if config.robust_trim else data
    # a fine-tune: Adam's moments belong to the robust loss, and at the full rate the first
    # updates undo more of the fit than the kept rows' tails add
    run.optimizer, run.stale = run.new_optimizer(REFIT_LR_FACTOR), 0
    robust_best = run.best
    plain = replace(config, robust_trim=0.0, robust_drop=0.0)
    epochs = 0
    for _ in range(REFIT_EPOCHS):
        stats = run.epoch(kept, plain, beta=1.0, trim=0.0, refit=True)
        epochs += 1
        if run.stop_after(stats):
            break
    rows = data.counts.rows_train
    return SetAside(
        rows=kept.excluded_rows,
        share=kept.excluded_rows / max(rows, 1),
        cutoff=cutoff,
        quartiles=quartiles,
        fence=config.refit_fence,
        refit_epochs=epochs,
        chosen=run.best > robust_best,
    )
