"""Scoring's importance sampler, chosen once per model at training: how wide its proposal is
(the factor on q(z|x)'s standard deviation in the importance weights; bench/notes/, "A proposal
scale chosen per model" and "The proposal scale by the design's expectation"), and how many
points it takes (`choose_k`)."""

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
K_CHOICE_ROWS = 2_000  # validation rows `choose_k` measures on (K_REFERENCE points each)


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


def choose_k(model, data, spec, scoring, device, budget: float, trim: float) -> tuple[int, dict]:
    """(K, {K tried: its error}): the smallest K of defaults.K_LADDER whose validation rows'
    mean IWAE is within `budget` nats of the same rows' at defaults.K_REFERENCE, each with the
    model's own points, seed and proposal scale; where none is, the one with the smallest
    error.

    Scoring shares one draw of the points across records (common random numbers), so a table's
    mean error is not only the estimator's bias, which falls as 1/K, but that draw's luck,
    which every record shares and no number of records averages away: on models the default K
    was not chosen on it reached +-0.07 to 0.09 nats at K = 24 (bench/k_families.py). The
    error is measured here on the scorer's own draw, so it is the error scoring will make; the
    worst `trim` of the rows by the reference (where anomalies in the training data sit) do not
    count."""
    rows = min(data.x_val.shape[0], K_CHOICE_ROWS)
    x, m = data.x_val[:rows].to(device), data.m_val[:rows].to(device)
    log_std = spec.continuous_log_std.to(device)

    def mean_iwae(k: int) -> torch.Tensor:
        with torch.inference_mode():
            proposal = model.encoder(x, m).widened(scoring.proposal_scale)
            return iwae(
                model, x, m, k=k, seed=scoring.seed, log_std=log_std, posterior=proposal,
                points=scoring.points,
            ).log_likelihood.double().cpu()  # fmt: skip

    reference = mean_iwae(defaults.K_REFERENCE)
    keep = reference >= torch.quantile(reference, trim)
    errors = {}
    for k in defaults.K_LADDER:
        errors[k] = float((reference - mean_iwae(k))[keep].mean())
        if abs(errors[k]) <= budget:
            return k, errors
    # none within the budget: the draw's luck does not fall steadily with K (heavy-tailed
    # weights: measured +0.062, -0.062, +0.038, -0.082 at 24 to 192 on a model of the demo's
    # data), so the K whose error is smallest, not the largest K
    return min(errors, key=lambda k: (abs(errors[k]), k)), errors
