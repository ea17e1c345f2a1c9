"""How wide scoring's proposal is: the factor on q(z|x)'s standard deviation in the importance
weights, chosen once per model at training (bench/notes/, "A proposal scale chosen per
model" and "The proposal scale by the design's expectation")."""

from __future__ import annotations

import math

import torch

from vaewatch.model import defaults
from vaewatch.model.estimation.estimators import DEFAULT_MEMORY_BUDGET, iwae
from vaewatch.model.estimation.noise import independent_draws
from vaewatch.model.network.vae import Posterior
from vaewatch.model.training.loop import VALIDATION_IWAE_ROWS, trimmed_mean

# independent draws of the scoring design the validation rows are spread over (row i takes draw
# i mod DRAWS): the criterion's noise from the points is then ~1/8 of one shared draw's
DRAWS = 64
SCALE_STREAM = 3  # not the scorer's stream (estimators.IWAE_STREAM): no draw is the scored one


def choose_proposal_scale(
    model, data, spec, scoring, device, trim: float, draws: torch.Tensor | None = None
) -> float:
    """The factor of defaults.PROPOSAL_SCALES whose IWAE (the scoring K and design) has the
    highest trimmed mean on the validation rows. Each IWAE is a lower bound in expectation,
    so the highest is the tightest; an encoder trained on the ELBO tends to be narrower than its
    posterior, and a wider proposal then brings every record's estimate closer to log p(x).

    The expectation is over the design's draws, not the one the scorer uses: with one shared
    draw every record's estimate moves with that draw's luck, by more than the factors differ,
    and the highest of four noisy means is the luckiest one (on the suite's pPCA with an
    already too wide q it chose 2 on 4 of 8 seeds, at 5x the error of 1). So the rows are
    spread over DRAWS independent draws. `data`: x_val and m_val, the validation rows;
    `scoring`: the model's ScoringDefaults; `draws` ((n, K, D)) replaces the draws of its design
    (bench/as_scored.py gives i.i.d. ones to the i.i.d. baseline)."""
    rows = min(data.x_val.shape[0], VALIDATION_IWAE_ROWS)
    x, m = data.x_val[:rows].to(device), data.m_val[:rows].to(device)
    log_std = spec.continuous_log_std.to(device)
    if draws is None:
        draws = independent_draws(
            min(DRAWS, rows), scoring.k, model.config.latent_dim, scoring.seed, SCALE_STREAM,
            scoring.points,
        )  # fmt: skip
    draws = draws[:rows]
    # row i takes draw i mod n; reordered so each draw's rows are one slice, and the points
    # given per record, as many draws a call as DEFAULT_MEMORY_BUDGET holds of them
    n = len(draws)
    order = torch.argsort(torch.arange(rows) % n, stable=True).to(x.device)
    x, m = x[order], m[order]
    counts = torch.bincount(torch.arange(rows) % n, minlength=n)
    ends = counts.cumsum(0).tolist()
    per_draw = draws.shape[1] * int(counts.max()) * draws.shape[2] * draws.element_size()
    step = max(1, DEFAULT_MEMORY_BUDGET // per_draw)
    calls = [(j, min(j + step, n)) for j in range(0, n, step)]
    best, best_value = 1.0, -math.inf
    with torch.inference_mode():
        posterior = model.encoder(x, m)
        for scale in defaults.PROPOSAL_SCALES:
            widened, lls = posterior.widened(scale), []
            for first, last in calls:
                lo, hi = ends[first] - int(counts[first]), ends[last - 1]
                eps = draws[first:last].repeat_interleave(counts[first:last], dim=0)
                part = Posterior(widened.mean[lo:hi], widened.log_var[lo:hi])
                lls.append(
                    iwae(
                        model,
                        x[lo:hi],
                        m[lo:hi],
                        eps=eps.transpose(0, 1),
                        log_std=log_std,
                        posterior=part,
                    ).log_likelihood  # fmt: skip
                )
            value = trimmed_mean(torch.cat(lls).cpu().numpy(), trim)
            if value > best_value:
                best, best_value = scale, value
    return best
