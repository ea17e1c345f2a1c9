"""How wide scoring's proposal is: the factor on q(z|x)'s standard deviation in the importance
weights, chosen once per model at training (bench/RESULTS.md, "A proposal scale chosen per
model")."""

from __future__ import annotations

import math

import torch

from vaewatch.model import defaults
from vaewatch.model.estimators import iwae
from vaewatch.model.training import VALIDATION_IWAE_ROWS, trimmed_mean


def choose_proposal_scale(model, data, spec, scoring, device, trim: float) -> float:
    """The factor of defaults.PROPOSAL_SCALES whose IWAE (the scoring K, seed and points) has
    the highest trimmed mean on the validation rows. Each IWAE is a lower bound in expectation,
    so the highest is the tightest; an encoder trained on the ELBO tends to be narrower than its
    posterior, and a wider proposal then brings every record's estimate closer to log p(x).
    `data`: x_val and m_val, the validation rows; `scoring`: the model's ScoringDefaults."""
    rows = min(data.x_val.shape[0], VALIDATION_IWAE_ROWS)
    x, m = data.x_val[:rows].to(device), data.m_val[:rows].to(device)
    log_std = spec.continuous_log_std.to(device)
    best, best_value = 1.0, -math.inf
    with torch.inference_mode():
        posterior = model.encoder(x, m)
        for scale in defaults.PROPOSAL_SCALES:
            ll = iwae(
                model, x, m, k=scoring.k, seed=scoring.seed, log_std=log_std,
                posterior=posterior.widened(scale), points=scoring.points,
            ).log_likelihood  # fmt: skip
            value = trimmed_mean(ll.cpu().numpy(), trim)
            if value > best_value:
                best, best_value = scale, value
    return best
