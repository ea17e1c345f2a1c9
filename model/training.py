"""Fitting a VAE: Adam on mini-batches, a seeded validation split, early stopping.

Objectives (per record, averaged only at the very end):
- "elbo": reconstruction - beta * KL, with beta warmed up linearly from 0 to 1 and optional
  free bits (each latent dimension's KL counts at least `free_bits` nats, Kingma et al. 2016).
- "iwae": the K-sample importance-weighted bound (Burda et al. 2015) with independent noise per
  record; no warm-up, the bound is the objective.
Validation reports the plain ELBO (beta = 1, no free bits) and the IWAE with the production
estimator, so runs are comparable; early stopping watches the objective's own validation value.

Data. `TrainingData` holds the validation sample in memory and serves shuffled mini-batches of
the training rows, either from memory (when the encoded rows fit `cache_bytes`: an exact
shuffle each epoch) or streamed from Parquet each epoch (files in a fresh seeded order, rows
shuffled inside a buffer of `shuffle_buffer_rows`), so training data larger than memory works.
Which rows are held out is decided per row by a seeded hash of its position in the sorted file
list: the split does not depend on batch boundaries, the read order or the cache.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from model.data import ParquetSource
from model.errors import UserError
from model.estimators import DEFAULT_K
from model.estimators import elbo as elbo_estimate
from model.estimators import iwae as iwae_estimate
from model.features import FeatureSpec
from model.vae import VAE, gaussian_kl_dims

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015: unit u is active if Cov_x(E_q[z_u]) > 0.01
VALIDATION_IWAE_ROWS = 10_000  # per-epoch IWAE on at most this many rows (~0.5 s at K=64, CPU)


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UserError(
            f"device {device!r} is not a torch device ({err}); use auto, cpu or cuda"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {device!r} asked for, but this machine has no CUDA device; "
            "use --device auto or --device cpu"
        )
    return resolved


@dataclass
class TrainConfig:
    epochs: int = 40  # upper bound; early stopping usually ends sooner
    batch_size: int = 256  # small enough for many updates per epoch on 10k-row tables
    learning_rate: float = 1e-3  # Adam's usual default, stable for these MLP sizes
    weight_decay: float = 0.0  # the KL term already regularises the encoder
    objective: str = "elbo"  # "elbo" or "iwae"
    train_k: int = 5  # IWAE samples per record when objective == "iwae" (k=5 as in Burda et al.)
    kl_warmup_epochs: int = 5  # beta: 0 -> 1 over these epochs, against early posterior collapse
    free_bits: float = 0.0  # nats per latent dim below which KL is not penalised (0 = off)
    validation_fraction: float = 0.1  # held out for early stopping and calibration
    patience: int = 5  # epochs without validation improvement before stopping
    # an epoch is at least this many updates: a small table is passed over several times per
    # epoch, so 40 epochs of 80 rows are 2,000 updates, not 40 (measured on scikit-learn's wine
    # and breast cancer: one pass per epoch stopped at 40 updates with no active latent units)
    min_steps_per_epoch: int = 50
    min_delta: float = 1e-3  # nats/record that count as an improvement
    seed: int = 0  # drives init, the split, shuffling and the training noise
    device: str = "auto"  # "auto" picks CUDA when present
    mixed_precision: bool = True  # bfloat16 autocast on CUDA (no effect on CPU)
    validation_k: int = DEFAULT_K  # IWAE samples for the per-epoch validation IWAE
    validation_trim: float = 0.01  # early stopping ignores the worst 1% of validation rows:
    # training data for anomaly detection is rarely clean, and the few anomalous rows get *less*
    # likely as the model fits normal data, so they dominate a plain mean (measured on the demo:
    # 0.5% contamination drove the mean validation ELBO from -12 to -47,000 nats while the
    # model improved on every normal row)

    def __post_init__(self) -> None:
        if self.objective not in ("elbo", "iwae"):
            raise ValueError(f"objective must be 'elbo' or 'iwae', got {self.objective!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )
        if not 0.0 <= self.validation_trim < 0.5:
            raise ValueError(f"validation_trim must be in [0, 0.5), got {self.validation_trim}")
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
    val_criterion: float  # what early stopping maximises: the objective's trimmed mean
    kl_per_dim: list[float]  # mean KL of each latent dimension on validation
    active_units: int  # latent dims with Cov_x(E_q[z_u]) > ACTIVE_UNIT_THRESHOLD
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = -1
    device: str = "cpu"


# ---------------------------------------------------------------------------------- the split
def row_uniforms(ordinals: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in [0, 1) per row ordinal: splitmix64 of (ordinal, seed). Vectorised."""
    with np.errstate(over="ignore"):
        z = ordinals.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) row indices of range(n): row i is held out iff its uniform < fraction."""
    u = row_uniforms(np.arange(n), seed)
    held = u < fraction
    return torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))


# ---------------------------------------------------------------------------------- the data
@dataclass
class DataCounts:
    rows_read: int = 0
    rows_unusable: int = 0  # rows the encoder flags (all features missing, +-inf)
    rows_train: int = 0
    rows_held_out: int = 0  # the validation split
    rows_validation: int = 0  # the held-out rows kept in memory for validation and calibration

    def to_json(self) -> dict:
        return asdict(self)


class TrainingData:
    """Training rows served as shuffled mini-batches, plus an in-memory validation sample."""

    def __init__(self) -> None:  # use from_tensors / from_parquet
        self.x_val = self.m_val = None
        self._x = self._m = None  # cached training rows, when they fit
        self._stream = None  # (source, spec, fraction, seed, buffer rows, read rows) otherwise
        self.counts = DataCounts()

    @property
    def cached(self) -> bool:
        return self._x is not None

    @classmethod
    def from_tensors(
        cls, x: torch.Tensor, mask: torch.Tensor, validation_fraction: float, seed: int
    ) -> TrainingData:
        train_idx, val_idx = split_indices(x.shape[0], validation_fraction, seed)
        data = cls()
        data._x, data._m = x[train_idx], mask[train_idx]
        data.x_val, data.m_val = x[val_idx], mask[val_idx]
        data.counts = DataCounts(
            rows_read=x.shape[0],
            rows_train=len(train_idx),
            rows_held_out=len(val_idx),
            rows_validation=len(val_idx),
        )
        data._check()
        return data

    @classmethod
    def from_parquet(
        cls,
        source: ParquetSource,
        spec: FeatureSpec,
        *,
        validation_fraction: float,
        seed: int,
        max_validation_rows: int = 200_000,
        cache_bytes: int = 2 * 2**30,
        shuffle_buffer_rows: int = 262_144,
        read_batch_rows: int = 65_536,
    ) -> TrainingData:
        """One pass over the files: count, keep the validation sample, cache training rows if
        their encoded size is within `cache_bytes` (else they are streamed every epoch)."""
        data = cls()
        expected_held = max(1.0, source.num_rows() * validation_fraction)
        keep = validation_fraction * min(1.0, max_validation_rows / expected_held)
        columns = spec.names()
        xs, ms, xv, mv = [], [], [], []
        bytes_per_row = len(columns) * 5  # float32 value + bool mask
        counts = data.counts
        for first, batch in source.batches(columns, batch_rows=read_batch_rows):
            enc = spec.encode(batch)
            u = row_uniforms(np.arange(first, first + batch.num_rows), seed)
            ok = enc.ok
            train = ok & (u >= validation_fraction)
            validation = ok & (u < keep)
            counts.rows_read += batch.num_rows
            counts.rows_unusable += int((~ok).sum())
            counts.rows_train += int(train.sum())
            counts.rows_held_out += int((ok & (u < validation_fraction)).sum())
            counts.rows_validation += int(validation.sum())
            xv.append(enc.x[torch.from_numpy(validation)])
            mv.append(enc.mask[torch.from_numpy(validation)])
            if counts.rows_train * bytes_per_row <= cache_bytes:
                xs.append(enc.x[torch.from_numpy(train)])
                ms.append(enc.mask[torch.from_numpy(train)])
            else:
                xs, ms = None, None
        if xs is not None and xs:
            data._x, data._m = torch.cat(xs), torch.cat(ms)
        else:
            data._stream = (
                source,
                spec,
                validation_fraction,
                seed,
                shuffle_buffer_rows,
                read_batch_rows,
            )
        n_features = len(columns)
        data.x_val = torch.cat(xv) if xv else torch.zeros((0, n_features))
        data.m_val = torch.cat(mv) if mv else torch.zeros((0, n_features), dtype=torch.bool)
        data._check()
        return data

    def _check(self) -> None:
        c = self.counts
        if c.rows_train < 1 or c.rows_validation < 1:
            raise UserError(
                f"too little usable data to train: {c.rows_read} rows read, {c.rows_unusable} "
                f"unusable, {c.rows_train} for training and {c.rows_validation} for validation; "
                "give more rows or a larger --validation-fraction"
            )

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (x, mask) mini-batches in a seeded random order."""
        if self._x is not None:
            order = torch.randperm(self._x.shape[0], generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                yield self._x[index], self._m[index]
            return
        source, spec, fraction, seed, buffer_rows, read_rows = self._stream
        file_order = torch.randperm(len(source.files), generator=generator).tolist()
        pending_x, pending_m, pending = [], [], 0

        def drain(final: bool):
            x, m = torch.cat(pending_x), torch.cat(pending_m)
            order = torch.randperm(x.shape[0], generator=generator)
            usable = x.shape[0] if final else (x.shape[0] // batch_size) * batch_size
            for start in range(0, usable, batch_size):
                index = order[start : min(start + batch_size, usable)]
                yield x[index], m[index]
            rest = order[usable:]
            pending_x[:], pending_m[:] = [x[rest]], [m[rest]]

        for first, batch in source.batches(spec.names(), read_rows, file_order=file_order):
            enc = spec.encode(batch)
            u = row_uniforms(np.arange(first, first + batch.num_rows), seed)
            train = torch.from_numpy(enc.ok & (u >= fraction))
            pending_x.append(enc.x[train])
            pending_m.append(enc.mask[train])
            pending += int(train.sum())
            if pending >= buffer_rows:
                yield from drain(final=False)
                pending = pending_x[0].shape[0]
        if pending:
            yield from drain(final=True)


# ---------------------------------------------------------------------------------- the loop
def _loss(model: VAE, x, mask, config: TrainConfig, beta: float, generator):
    """(loss to minimise, plain ELBO per record detached), both per-record means."""
    posterior = model.encoder(x, mask)
    if config.objective == "iwae":
        eps = torch.randn(
            (config.train_k, x.shape[0], model.config.latent_dim), generator=generator
        ).to(x.device)
        bound = iwae_estimate(model, x, mask, eps=eps, memory_budget=2**40, posterior=posterior)
        with torch.no_grad():
            plain = elbo_estimate(model, x, mask, eps=eps[:1, 0], posterior=posterior).elbo
        return -bound.log_likelihood.mean(), plain.mean()
    eps = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    z = posterior.mean + posterior.std * eps
    reconstruction = model.decoder.log_prob(z, x, mask).total()
    kl_dims = gaussian_kl_dims(posterior)  # (B, D)
    plain = (reconstruction - kl_dims.sum(-1)).detach().mean()
    if config.free_bits > 0:
        kl_dims = torch.clamp(kl_dims.mean(0, keepdim=True), min=config.free_bits).expand_as(
            kl_dims
        )
    return -(reconstruction - beta * kl_dims.sum(-1)).mean(), plain


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
        eps = torch.randn((b, d), generator=generator).to(xs.device)
        z = posterior.mean + posterior.std * eps
        kl = gaussian_kl_dims(posterior)
        elbos.append((model.decoder.log_prob(z, xs, ms).total() - kl.sum(-1)).double().cpu())
        kl_dims += kl.sum(0).cpu()
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
    """
    config = config or TrainConfig()
    if isinstance(data, torch.Tensor):
        model.check_input(data, mask)
        data = TrainingData.from_tensors(data, mask, config.validation_fraction, config.seed)
    device = resolve_device(config.device)
    autocast = device.type == "cuda" and config.mixed_precision
    torch.manual_seed(config.seed)
    model.reset_parameters()
    generator = torch.Generator().manual_seed(config.seed + 1)
    model.to(device).train()
    x_val, m_val = data.x_val.to(device), data.m_val.to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    result = TrainResult(device=str(device))
    best, best_state, stale = -math.inf, None, 0
    passes = config.passes_per_epoch(data.counts.rows_train)
    for epoch in range(config.epochs):
        started = time.perf_counter()
        beta = min(1.0, (epoch + 1) / config.kl_warmup_epochs) if config.kl_warmup_epochs else 1.0
        running, running_elbo, seen = 0.0, 0.0, 0
        batches = (b for _ in range(passes) for b in data.batches(config.batch_size, generator))
        for x, mask_b in batches:
            x, mask_b = x.to(device, non_blocking=True), mask_b.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, plain = _loss(model, x, mask_b, config, beta, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}; lower --learning-rate "
                    "or check the data for extreme values"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            running += loss_value * x.shape[0]
            running_elbo += plain.item() * x.shape[0]
            seen += x.shape[0]
            if on_step is not None:
                on_step(x.shape[0], loss_value)
        val = _validate(model, x_val, m_val, config.validation_k, config.seed)
        stats = EpochStats(
            epoch=epoch,
            train_loss=running / seen,
            train_elbo=running_elbo / seen,
            val_elbo=float(val.elbo.mean()),
            val_iwae=float(val.iwae.mean()),
            val_criterion=trimmed_mean(
                val.iwae if config.objective == "iwae" else val.elbo, config.validation_trim
            ),
            kl_per_dim=val.kl_per_dim,
            active_units=val.active_units,
            seconds=time.perf_counter() - started,
        )
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        score = stats.val_criterion
        if score > best + config.min_delta:
            best, stale, result.best_epoch = score, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
