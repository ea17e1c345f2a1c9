"""Figures for training runs and reports (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on batch machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vaewatch.model.training.loop import EpochStats  # noqa: E402


def loss_curves(history: Sequence[EpochStats], best_epoch: int, path: Path) -> Path:
    """Train loss, validation ELBO and IWAE per epoch; KL per latent dim and active units."""
    epochs = [h.epoch for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    left.plot(epochs, [h.train_loss for h in history], label="train loss (objective)")
    left.plot(epochs, [-h.train_elbo for h in history], label="train -ELBO")
    left.plot(epochs, [-h.val_elbo for h in history], label="validation -ELBO")
    left.plot(epochs, [-h.val_iwae for h in history], label="validation -IWAE")
    if best_epoch >= 0:
        left.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    left.set_xlabel("epoch")
    left.set_ylabel("nats per record (standardised units)")
    left.set_title("Loss")
    left.legend(fontsize=8)
    kl = np.asarray([h.kl_per_dim for h in history])  # (epochs, D)
    for u in range(kl.shape[1]):
        right.plot(epochs, kl[:, u], linewidth=1)
    right.set_xlabel("epoch")
    right.set_ylabel("KL per latent dimension (nats)")
    twin = right.twinx()
    twin.step(epochs, [h.active_units for h in history], color="black", where="mid")
    twin.set_ylabel("active units (black)")
    twin.set_ylim(0, kl.shape[1] + 0.5)
    right.set_title("Latent usage")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_histogram(
    anomaly_scores: np.ndarray, threshold: float, threshold_quantile: float, path: Path, title: str
) -> Path:
    """Histogram of anomaly scores with the threshold marked."""
    scores = np.asarray(anomaly_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.hist(scores, bins=min(100, max(10, scores.size // 20)), color="#4c72b0")
    ax.axvline(
        threshold, color="#c44e52", linestyle="--", label=f"threshold (q={threshold_quantile:g})"
    )
    ax.set_yscale("log")
    ax.set_xlabel("anomaly score (nats, -IWAE log-likelihood)")
    ax.set_ylabel("records")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
