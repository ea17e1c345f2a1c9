"""Per-record likelihood estimators: the ELBO and the importance-weighted bound (IWAE).

One core, `weight_chunks`, runs the encoder and the decoder over (sample, record) chunks and
yields, per chunk, each feature's log p(x_j|z_k) and each sample's log-weight
log w_k = log p(x, z_k) - log q(z_k|x). Everything else is a reduction of it:

- `iwae`: log-mean-exp of the K log-weights (a running logsumexp over sample chunks), and from
  the same pass: the ELBO as the plain mean of the same K log-weights (so elbo <= IWAE_K holds
  for every record, exactly, by Jensen's inequality), the Monte Carlo standard error of the
  IWAE from its independent replicates, and the attribution (each feature's -log p(x_j|z) under
  the self-normalised weights, an online softmax);
- `elbo`: the mean over S samples of log p(x|z_s), minus the analytic KL (training and
  validation, with fresh noise per record);
- the training objectives (model/training/loop.py): the same two reductions with fresh noise per
  record and gradients on.

Every function returns one value per record (never a batch mean), in nats of the record in its
*original* units: the model works on standardised continuous features, so each observed
continuous feature j adds back log|d x_std / d x| = -log std_j.

Randomness. Scoring uses common random numbers: one set of K points in latent space, made on the
CPU from the seed and reused for every record, so a record's score is a deterministic function
of (record, model, K, seed) alone, whatever the batch it arrives in, the device or the number of
workers. The points are a randomised design (model/estimation/noise.py): R = 4 independent
replicates of K/R points (rotated simplices with stratified radii; scrambled Sobol for older
models), each point marginally N(0, I), so the ELBO stays unbiased and the IWAE keeps its
bound. How accurate that is at the default K: model/defaults.py. The replicates' spread is the
standard error (`log_likelihood_se`, below): the seed-to-seed spread, on likely and unlikely
records alike, never the IWAE's downward bias.

Memory. `plan_chunks` turns a byte budget into a number of records and of samples per step, so
peak memory is bounded by the budget and never grows with K.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vaewatch.model import defaults
from vaewatch.model._moved import deprecated_defaults
from vaewatch.model.estimation.noise import iid_noise, noise, replicates
from vaewatch.model.network.vae import LOG_2PI, VAE, FeatureLogProbs, Posterior, gaussian_kl

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes of decoder intermediates per step; 64 MiB measured
# faster than 256 MiB on CPU (bench/estimators.py --budgets): chunks stay cache- and malloc-friendly
SAMPLES_PER_STEP = 8  # at least this many samples per decoder step, fewer records (plan_chunks)
UNBOUNDED = 2**62  # a budget that never splits (training: one pass per mini-batch)

IWAE_STREAM, ELBO_STREAM = 1, 2


def bytes_per_pair(model: VAE, dtype: torch.dtype = torch.float32, shared_by: int = 8) -> int:
    """Working memory for one (sample, record) pair in the decoder: activations, the outputs,
    log-density intermediates, three passes over the categorical logits held at once (one block
    where the head is blocked, model/network/categorical.py), and a share of the class rows a
    two-level
    block gathers per record (shared by a step's `shared_by` samples).
    Generous on purpose: chunks that fit the cache are faster (1.5x larger: 3x slower on
    20,000 logits)."""
    c, cats = model.config, model.decoder.categories
    gathered = cats.gathered_rows * ((c.hidden or [c.latent_dim])[-1] + 1) // shared_by
    elements = 4 * c.latent_dim + 2 * sum(c.hidden) + 8 * c.n_features + gathered
    elements += 2 * (c.decoder_output_dim - cats.rows + cats.materialised) + 3 * cats.materialised
    return elements * torch.tensor([], dtype=dtype).element_size()


def plan_chunks(
    n_records: int, n_samples: int, pair_bytes: int, budget: int, least: int = SAMPLES_PER_STEP
) -> tuple[int, int]:
    """(records per step, samples per step) so that records * samples * pair_bytes <= budget.

    A step holds `least` samples (all K when fewer) for as many records as then fit: each step
    also costs work per record and a fixed cost in Python, so one sample for 15,000 records is
    the slowest shape (65,536-record batches, K=32, bf16, 64 MiB: 35.5k records/s with one
    sample per step, 45.8k with 8). A model with two-level groups takes all K (`iwae`)."""
    max_pairs = max(1, budget // max(1, pair_bytes))
    records = max(1, min(n_records, max_pairs // min(n_samples, least)))
    samples = max(1, min(n_samples, max_pairs // records))
    return records, samples


def jacobian(density: torch.Tensor, log_std: torch.Tensor | None) -> torch.Tensor:
    """Per record: sum of log std_j over the continuous features scored by a density
    (`Decoder.density_mask`: observed, not at a point mass), to subtract. (B,) float64"""
    if log_std is None or density.shape[1] == 0:
        return torch.zeros(density.shape[0], dtype=torch.float64, device=density.device)
    return density.to(torch.float64) @ log_std.to(device=density.device, dtype=torch.float64)


def matmul_autocast(device_type: str, matmul_dtype: torch.dtype | None) -> torch.autocast:
    """The MLPs' matmuls in `matmul_dtype` under autocast (off when it is None): the estimators'
    `matmul_dtype` argument."""
    return torch.autocast(
        device_type, dtype=matmul_dtype or torch.bfloat16, enabled=matmul_dtype is not None
    )


# ------------------------------------------------------------------------------ the core
def reparameterise(posterior: Posterior, eps: torch.Tensor) -> torch.Tensor:
    """z = mean + std * eps: eps (k, D) shared by every record (common random numbers), or
    (k, B, D) one draw per record. -> (k, B, D)"""
    eps = eps.to(device=posterior.mean.device, dtype=posterior.mean.dtype)
    if eps.dim() == 2:
        eps = eps[:, None, :]
    return posterior.mean + posterior.std * eps


@dataclass
class SampleChunk:
    """Samples [start, start + k) of one record chunk, standardised units."""

    start: int
    feature_lp: FeatureLogProbs  # log p(x_j|z_k) by kind, each (k, b, F_kind)
    log_w: torch.Tensor  # (k, b): log p(x, z_k) - log q(z_k|x)
    z: torch.Tensor  # (k, b, D): the points (the explanations read the decoder's heads there)


@dataclass
class RecordChunk:
    """Records [start, start + b) of the batch, with their posterior and sample chunks."""

    start: int
    mask: torch.Tensor  # (b, F)
    density: torch.Tensor  # (b, F_cont): continuous values scored by a density (Jacobian)
    posterior: Posterior  # (b, D)
    samples: Iterator[SampleChunk]  # consume in order, once


def weight_chunks(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    eps: torch.Tensor,
    *,
    posterior: Posterior | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Iterator[RecordChunk]:
    """The one place where z is sampled and p(x, z) / q(z|x) evaluated. `eps` is (K, D) common
    noise or (K, B, D) noise per record; `posterior` reuses an encoder pass over all of x."""
    model.check_input(x, mask)
    n_records, n_samples = x.shape[0], eps.shape[0]
    # a two-level group gathers weight rows per record in every step: share them by all K
    # samples (1.2x on 20 strings of 1,000 values, K = 24)
    least = n_samples if model.decoder.categories.gathered_rows else SAMPLES_PER_STEP
    pair = bytes_per_pair(model, x.dtype, min(least, n_samples))
    step_records, step_samples = plan_chunks(n_records, n_samples, pair, memory_budget, least)
    for r0 in range(0, n_records, step_records):
        xs, ms = x[r0 : r0 + step_records], mask[r0 : r0 + step_records]
        if posterior is None:
            post = model.encoder(xs, ms)
        else:
            post = Posterior(
                posterior.mean[r0 : r0 + step_records], posterior.log_var[r0 : r0 + step_records]
            )
        eps_records = eps if eps.dim() == 2 else eps[:, r0 : r0 + step_records]
        yield RecordChunk(
            r0,
            ms,
            model.decoder.density_mask(xs, ms),
            post,
            _sample_chunks(model, post, xs, ms, eps_records, step_samples),
        )


def _sample_chunks(model: VAE, post: Posterior, x, mask, eps, step: int) -> Iterator[SampleChunk]:
    d = model.config.latent_dim
    for k0 in range(0, eps.shape[0], step):
        e = eps[k0 : k0 + step].to(device=x.device, dtype=post.mean.dtype)
        z = reparameterise(post, e)  # (k, b, D)
        feature_lp = model.decoder.log_prob(z, x, mask)
        log_prior = -0.5 * (d * LOG_2PI + (z * z).sum(-1))  # (k, b)
        e = e if e.dim() == 3 else e[:, None, :]
        log_q = -0.5 * (d * LOG_2PI + post.log_var.sum(-1) + (e * e).sum(-1))
        yield SampleChunk(k0, feature_lp, feature_lp.total() + log_prior - log_q, z)


# ------------------------------------------- chunk by chunk over the sample axis
# A running log-sum-exp, each independent replicate's log-sum at its own scale, and the standard
# error from the replicates' spread (used here and by estimation/attribution.py).
def running_log_sum_exp(state, log_w: torch.Tensor):
    """(max, sum of exp(log_w - max)) over the sample axis, `state` holding the earlier chunks'
    (None for the first)."""
    top = log_w.max(0).values
    if state is not None:
        top = torch.maximum(state[0], top)
    total = torch.exp(log_w - top).sum(0)
    return (top, total) if state is None else (top, state[1] * torch.exp(state[0] - top) + total)


def block_log_sums(state, log_w: torch.Tensor, start: int, size: int, blocks: int):
    """Each replicate's log sum_k w_k (replicate r: samples [r * size, (r + 1) * size)), updated
    with the chunk of samples from `start`: every replicate at its own scale, so one far below
    another does not underflow (a shared scale did, ~700 nats)."""
    chunk = torch.full((blocks, log_w.shape[1]), -math.inf, dtype=log_w.dtype, device=log_w.device)
    end = start + log_w.shape[0]
    for r in range(start // size, (end - 1) // size + 1):  # the replicates this chunk touches
        lo, hi = max(start, r * size), min(end, (r + 1) * size)
        chunk[r] = torch.logsumexp(log_w[lo - start : hi - start], 0)
    return chunk if state is None else torch.logaddexp(state, chunk)


def replicate_error(block_lse: torch.Tensor) -> torch.Tensor:
    """SE of log(mean w): sd of the R independent replicates' log-means (log K/R cancels) /
    sqrt(R); to first order the delta method, but it does not saturate at ~1 nat when one
    replicate holds nearly all the weight, as on a trained model's least likely records
    (bench/accuracy_breadth.py). NaN for one replicate."""
    blocks = block_lse.shape[0]
    if blocks < 2:
        return torch.full_like(block_lse[0], math.nan)
    return block_lse.std(0, correction=1) / math.sqrt(blocks)


# ------------------------------------------------------------------------------ reductions
@dataclass
class IWAEResult:
    log_likelihood: torch.Tensor  # (B,) float64: log (1/K) sum_k w_k, original units
    elbo: torch.Tensor  # (B,) float64: (1/K) sum_k log w_k, original units; <= log_likelihood
    # (B,) float64: standard error of log_likelihood from the spread of the R independent
    # replicates (NaN when K has a single replicate); None unless asked for
    log_likelihood_se: torch.Tensor | None = None
    feature_nll: torch.Tensor | None = None  # (B, F) float64: -log p(x_j|z), normalised weights
    # (B,) float64: -log p(x_discrete | x_continuous), from the same K points (`iwae`); None
    # unless asked for, or when the model lacks continuous or discrete features
    discrete_nll: torch.Tensor | None = None


def iwae(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int = defaults.K,
    seed: int = defaults.SEED,
    log_std: torch.Tensor | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    contributions: bool = False,
    standard_error: bool = False,
    conditional: bool = False,
    eps: torch.Tensor | None = None,
    posterior: Posterior | None = None,
    points: str = defaults.POINTS,
) -> IWAEResult:
    """IWAE_K = log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k = mu + sigma * eps_k, per record, and
    the ELBO as the mean of the same K log-weights.

    `eps` overrides the seeded points of the design `points`: (K, D), or (K, B, D) for draws per
    record (training); `posterior` reuses an encoder pass. Differentiable with grad enabled (the
    IWAE objective). `standard_error` takes the K points as `replicates(K)` blocks, as `noise`.

    `conditional`: -log p(x_d | x_c) = log p(x_c) - log p(x), how unlikely the discrete values
    (booleans, categories, whether each was observed) are given the continuous ones, both from
    the same K points: p(x_c) is the importance sum with the discrete terms left out of each
    weight (q(z|x) is a valid proposal for p(z|x_c) too); the Jacobian and log K cancel.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if eps is None:
        eps = noise(k, model.config.latent_dim, seed, IWAE_STREAM, points)
    k = eps.shape[0]
    blocks = replicates(k)
    n_cont = model.config.n_continuous
    conditional = conditional and 0 < n_cont < model.config.n_features
    lls, elbos, ses, nlls, conds = [], [], [], [], []
    for chunk in weight_chunks(
        model, x, mask, eps, posterior=posterior, memory_budget=memory_budget
    ):
        b = chunk.mask.shape[0]
        running_max = running_sum = weighted_nll = continuous = None
        log_w_sum = torch.zeros(b, dtype=torch.float64, device=x.device)
        block_lse = None  # (blocks, b): each replicate's log-sum of w, at its own scale
        for s in chunk.samples:
            log_w = s.log_w.to(torch.float64)
            if k == 1:  # one weight: every reduction below is the identity (the same bits)
                running_max, running_sum = log_w[0], torch.ones_like(log_w[0])
                log_w_sum = log_w[0]
                block_lse = log_w if standard_error else None
                if contributions:
                    weighted_nll = -s.feature_lp.stacked()[0].to(torch.float64)
                if conditional:
                    discrete = s.feature_lp.stacked()[0, :, n_cont:].sum(-1).to(torch.float64)
                    continuous = (log_w[0] - discrete, running_sum)
                continue
            log_w_sum = log_w_sum + log_w.sum(0)
            chunk_max = log_w.max(0).values  # (b,)
            new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
            scaled = torch.exp(log_w - new_max)  # (k, b)
            rescale = None if running_max is None else torch.exp(running_max - new_max)
            total = scaled.sum(0)
            running_sum = total if rescale is None else running_sum * rescale + total
            if standard_error:
                block_lse = block_log_sums(block_lse, log_w.detach(), s.start, k // blocks, blocks)
            if contributions:
                # sum_k scaled_k * log p(x_j|z_k), reduced in the model's dtype (one pass)
                stacked = s.feature_lp.stacked()  # (k, b, F), only built when attribution is asked
                weights = scaled.to(stacked.dtype).unsqueeze(-1)  # (k, b, 1)
                chunk_nll = -(stacked * weights).sum(0).to(torch.float64)  # (b, F)
                weighted_nll = (
                    chunk_nll if rescale is None else weighted_nll * rescale[:, None] + chunk_nll
                )
            if conditional:  # log p(x_c, z_k) - log q(z_k|x): the discrete terms taken out
                discrete = s.feature_lp.stacked()[..., n_cont:].sum(-1).to(torch.float64)
                continuous = running_log_sum_exp(continuous, log_w - discrete)
            running_max = new_max
        correction = jacobian(chunk.density, log_std)
        lls.append(running_max + torch.log(running_sum) - math.log(k) - correction)
        elbos.append(log_w_sum / k - correction)
        if standard_error:
            ses.append(replicate_error(block_lse))
        if contributions:
            nll = weighted_nll / running_sum[:, None]
            n_cont = chunk.density.shape[1]
            if log_std is not None and n_cont:
                dense = chunk.density.to(torch.float64)
                nll[:, :n_cont] += dense * log_std.to(device=nll.device, dtype=torch.float64)
            nlls.append(nll)
        if conditional:
            conds.append(
                continuous[0] + torch.log(continuous[1]) - running_max - torch.log(running_sum)
            )
    return IWAEResult(
        log_likelihood=torch.cat(lls),
        elbo=torch.cat(elbos),
        log_likelihood_se=torch.cat(ses) if standard_error else None,
        feature_nll=torch.cat(nlls) if contributions else None,
        discrete_nll=torch.cat(conds) if conditional else None,
    )


@dataclass
class ELBOResult:
    elbo: torch.Tensor  # (B,) float64, original units
    reconstruction: torch.Tensor  # (B,) float64: mean over S samples of log p(x|z), original units
    kl: torch.Tensor  # (B,) float64: analytic KL(q(z|x) || p(z))


def elbo(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    samples: int = 1,
    seed: int = defaults.SEED,
    log_std: torch.Tensor | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    eps: torch.Tensor | None = None,
    posterior: Posterior | None = None,
) -> ELBOResult:
    """ELBO = (1/S) sum_s log p(x|z_s) - KL(q||p), the KL analytic, per record. `eps` is
    (S, D) common noise or (S, B, D) noise per record."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if eps is None:
        eps = iid_noise(samples, model.config.latent_dim, seed, ELBO_STREAM)
    recs, kls = [], []
    for chunk in weight_chunks(
        model, x, mask, eps, posterior=posterior, memory_budget=memory_budget
    ):
        total = sum(s.feature_lp.total().to(torch.float64).sum(0) for s in chunk.samples)
        correction = jacobian(chunk.density, log_std)
        recs.append(total / eps.shape[0] - correction)
        kls.append(gaussian_kl(chunk.posterior).to(torch.float64))
    reconstruction, kl = torch.cat(recs), torch.cat(kls)
    return ELBOResult(elbo=reconstruction - kl, reconstruction=reconstruction, kl=kl)


@dataclass
class RecordScores:
    """Everything the scorer reports per record; shapes (B,) or (B, ·)."""

    elbo: torch.Tensor  # float64: mean of the K log-weights, <= log_likelihood
    log_likelihood: torch.Tensor  # float64, IWAE_K
    log_likelihood_se: torch.Tensor  # float64, Monte Carlo standard error of log_likelihood
    latent_mean: torch.Tensor  # (B, D) float32
    latent_std: torch.Tensor  # (B, D) float32
    feature_nll: torch.Tensor  # (B, F) float64
    discrete_nll: torch.Tensor | None = None  # (B,) float64, -log p(x_d|x_c); None: no pair

    @property
    def anomaly_score(self) -> torch.Tensor:
        return -self.log_likelihood


def score_records(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    log_std: torch.Tensor | None,
    k: int = defaults.K,
    seed: int = defaults.SEED,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    matmul_dtype: torch.dtype | None = None,
    proposal_scale: float = 1.0,
    points: str = defaults.POINTS,
) -> RecordScores:
    """The production estimator: one encoder pass and one decoder pass over the K seeded points
    give the IWAE, the ELBO, the standard error, the attribution and the discrete features'
    conditional term of the flag rule. `matmul_dtype` (torch.bfloat16) runs the MLPs' matmuls in
    that dtype under autocast; the densities stay in the input's precision. `proposal_scale`
    widens q(z|x)'s sd in the importance weights (model/estimation/proposal.py); `points`:
    model/estimation/noise.py."""
    with torch.inference_mode(), matmul_autocast(x.device.type, matmul_dtype):
        posterior = model.encoder(x, mask)
        proposal = posterior.widened(proposal_scale)
        result = iwae(model, x, mask, k=k, seed=seed, log_std=log_std, memory_budget=memory_budget,
                      posterior=proposal, contributions=True, standard_error=True,
                      conditional=True, points=points)  # fmt: skip
    return RecordScores(
        elbo=result.elbo,
        log_likelihood=result.log_likelihood,
        log_likelihood_se=result.log_likelihood_se,
        latent_mean=posterior.mean.float(),
        latent_std=posterior.std.float(),
        feature_nll=result.feature_nll,
        discrete_nll=result.discrete_nll,
    )


# Names before 0.2.0 for defaults that live in vaewatch.model.defaults (until 0.3.0).
__getattr__ = deprecated_defaults(__name__, {"DEFAULT_K": "K", "DEFAULT_SEED": "SEED"})
