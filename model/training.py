"""Fitting a VAE: Adam on mini-batches, a seeded validation split, early stopping.

Objectives (per record, averaged only at the very end):
- "elbo": reconstruction - beta * KL, with beta warmed up linearly from 0 to 1 and optional
  free bits (each latent dimension's KL counts at least `free_bits` nats, Kingma et al. 2016).
- "iwae": the K-sample importance-weighted bound (Burda et al. 2015) with independent noise per
  record; no warm-up, the bound is the objective.
Validation always reports the plain ELBO (beta = 1, no free bits), so runs are comparable.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from model.estimators import elbo as elbo_estimate
from model.estimators import iwae as iwae_estimate
from model.vae import VAE, gaussian_kl_dims


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
    min_delta: float = 1e-3  # nats/record that count as an improvement
    seed: int = 0  # drives init, the split, shuffling and the training noise
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.objective not in ("elbo", "iwae"):
            raise ValueError(f"objective must be 'elbo' or 'iwae', got {self.objective!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float  # the objective's loss, nats/record
    val_elbo: float  # nats/record, standardised units
    kl_per_dim: list[float]  # mean KL of each latent dimension on validation
    seconds: float


@dataclass
class TrainResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = -1
    train_index: torch.Tensor | None = None
    val_index: torch.Tensor | None = None


def split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, validation) split of range(n) by seed."""
    if n < 2:
        raise ValueError(f"need at least 2 rows to hold out a validation split, got {n}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_val = min(n - 1, max(1, int(round(n * fraction))))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _loss(model: VAE, x, mask, config: TrainConfig, beta: float, generator) -> torch.Tensor:
    if config.objective == "iwae":
        eps = torch.randn(
            (config.train_k, x.shape[0], model.config.latent_dim), generator=generator
        ).to(x.device)
        return -iwae_estimate(model, x, mask, eps=eps, memory_budget=2**40).log_likelihood.mean()
    posterior = model.encoder(x, mask)
    eps = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    z = posterior.mean + posterior.std * eps
    reconstruction = model.decoder.log_prob(z, x, mask).total()
    kl_dims = gaussian_kl_dims(posterior)  # (B, D)
    if config.free_bits > 0:
        kl_dims = torch.clamp(kl_dims.mean(0, keepdim=True), min=config.free_bits).expand_as(
            kl_dims
        )
    return -(reconstruction - beta * kl_dims.sum(-1)).mean()


@torch.no_grad()
def _validate(model: VAE, x, mask) -> tuple[float, list[float]]:
    model.eval()
    total, kl_dims, n = 0.0, None, x.shape[0]
    for start in range(0, n, 4096):
        xs, ms = x[start : start + 4096], mask[start : start + 4096]
        posterior = model.encoder(xs, ms)
        total += elbo_estimate(model, xs, ms, samples=1, posterior=posterior).elbo.sum().item()
        dims = gaussian_kl_dims(posterior).sum(0)
        kl_dims = dims if kl_dims is None else kl_dims + dims
    model.train()
    return total / n, (kl_dims / n).tolist()


def train(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    config: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Fit `model` in place; it ends with the weights of the best validation epoch."""
    model.check_input(x, mask)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    train_idx, val_idx = split_indices(x.shape[0], config.validation_fraction, config.seed)
    model.to(device).train()
    x, mask = x.to(device), mask.to(device)
    x_val, m_val = x[val_idx.to(device)], mask[val_idx.to(device)]
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    result = TrainResult(train_index=train_idx, val_index=val_idx)
    best, best_state, stale = -math.inf, None, 0
    for epoch in range(config.epochs):
        started = time.perf_counter()
        beta = min(1.0, (epoch + 1) / config.kl_warmup_epochs) if config.kl_warmup_epochs else 1.0
        order = train_idx[torch.randperm(len(train_idx), generator=generator)].to(device)
        running, seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = _loss(model, x[batch], mask[batch], config, beta, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}; lower --learning-rate "
                    "or check the data for extreme values"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(batch)
            seen += len(batch)
        val_elbo, kl_per_dim = _validate(model, x_val, m_val)
        stats = EpochStats(
            epoch, running / seen, val_elbo, kl_per_dim, time.perf_counter() - started
        )
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if val_elbo > best + config.min_delta:
            best, best_state, stale, result.best_epoch = (
                val_elbo,
                copy.deepcopy(model.state_dict()),
                0,
                epoch,
            )
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
