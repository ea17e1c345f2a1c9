"""What the model expects of one feature given the rest of its record: p(x_j | x_-j), the
importance-weighted posterior predictive. The explanations of flagged records
(model/estimation/explanations.py) read it to say, in the data's own units, what value would
have been usual for the feature that made the record unusual.

    p(x_j | x_-j) = E_{p(z | x_-j)} p(x_j | z)  ~=  sum_k w_k p(x_j | z_k)

with z_k the K seeded points of the scores drawn from q(z | x_-j) (the encoder with x_j hidden,
widened as the estimator's proposal) and w_k proportional to p(x_-j, z_k) / q(z_k | x_-j),
normalised: the same points and weights whose sum is leave_one_out's p(x_-j)
(model/estimation/attribution.py), so the expectation and the contribution it explains come from
one estimate. A value's distribution is read *given that it is observed*: where the feature's
observation is modelled each weight also carries p(observed | z_k).

Per (record, feature) pair this gives, in standardised units (the caller converts):
- a number: the 5 %, 50 % and 95 % quantiles of the mixture of K Gaussians (each with its
  point mass at 0 for a zero-inflated column), found by bisection on the mixture's CDF, and
  the CDF at the observed value;
- a boolean or a category: the probability of every class; the observed one's, and the most
  likely ones;
- every feature whose observation is modelled: p(missing | x_-j).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from vaewatch.model import defaults
from vaewatch.model.data.features import FeatureKind
from vaewatch.model.estimation.attribution import PairWeights
from vaewatch.model.estimation.estimators import (
    IWAE_STREAM,
    matmul_autocast,
    reparameterise,
    weight_chunks,
)
from vaewatch.model.estimation.noise import noise
from vaewatch.model.network.vae import VAE, FeatureDistribution, Posterior

LEVELS = (0.05, 0.5, 0.95)  # the interval's ends and the central value
LIKELY = 3  # classes named per explained category, most likely first
CREDIBLE = 0.9  # a class is usual while the classes likelier than it hold less than this
BISECTIONS = 60  # at most this many steps (Newton's, or halvings of the bracket where it strays)
TOLERANCE = 1e-12  # on the CDF: a quantile is met when its level is within this


@dataclass
class Conditionals:
    """Per pair, float64 numpy arrays; NaN where a field does not apply to the feature's kind."""

    quantiles: np.ndarray  # (P, len(LEVELS)) standardised quantiles of a number
    cdf: np.ndarray  # (P,) P(X_j <= observed) for an observed number
    p_observed: np.ndarray  # (P,) p(observed class | x_-j) for an observed boolean or category
    usual: np.ndarray  # (P,) bool: an observed class inside the CREDIBLE set of likeliest classes
    p_missing: np.ndarray  # (P,) p(missing | x_-j) where the observation is modelled
    likely: np.ndarray  # (P, LIKELY) int64 class codes, most likely first; -1 past the classes
    likely_p: np.ndarray  # (P, LIKELY) their probabilities

    def put(self, rows: np.ndarray, other: Conditionals) -> None:
        """Write `other`'s pairs into these `rows`."""
        for name in ("quantiles", "cdf", "p_observed", "usual", "p_missing", "likely", "likely_p"):
            getattr(self, name)[rows] = getattr(other, name)

    @classmethod
    def empty(cls, n: int) -> Conditionals:
        nan = np.full(n, math.nan)
        return cls(
            quantiles=np.full((n, len(LEVELS)), math.nan),
            cdf=nan.copy(),
            p_observed=nan.copy(),
            usual=np.zeros(n, dtype=bool),
            p_missing=nan.copy(),
            likely=np.full((n, LIKELY), -1, dtype=np.int64),
            likely_p=np.full((n, LIKELY), math.nan),
        )


def conditionals(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    feature: torch.Tensor,
    *,
    k: int,
    seed: int,
    proposal_scale: float,
    memory_budget: int,
    matmul_dtype: torch.dtype | None = None,
    points: str = defaults.POINTS,
    **_,
) -> Conditionals:
    """p(x_j | x_-j) for each pair: row p of (x, mask) ((P, F), the record as the contribution
    read it) and feature j = feature[p] ((P,) long). `matmul_dtype` as in score_records; the
    mixtures themselves are float64. Extra keywords (the attribution's `log_std`) are ignored:
    the caller converts units."""
    out = Conditionals.empty(x.shape[0])
    if x.shape[0] == 0:
        return out
    eps = noise(k, model.config.latent_dim, seed, IWAE_STREAM, points)
    with torch.inference_mode(), matmul_autocast(x.device.type, matmul_dtype):
        hidden = mask.scatter(1, feature[:, None], False)
        proposal = model.encoder(x, hidden).widened(proposal_scale)
        for chunk in weight_chunks(model, x, mask, eps, posterior=proposal,
                                   memory_budget=memory_budget):  # fmt: skip
            b = chunk.mask.shape[0]
            own = feature[chunk.start : chunk.start + b]
            log_w, z = [], []
            for s in chunk.samples:  # each weight without feature j's terms: p(x_-j, z_k)
                lp = s.feature_lp.stacked()
                drop = lp.gather(-1, own[None, :, None].expand(lp.shape[0], b, 1)).squeeze(-1)
                log_w.append((s.log_w - drop).to(torch.float64))
                z.append(s.z)
            part = slice(chunk.start, chunk.start + b)
            _mix_features(model, torch.cat(z), torch.cat(log_w), x[part], mask[part], own, out,
                          np.arange(chunk.start, chunk.start + b))  # fmt: skip
    return out


def from_weights(
    model: VAE,
    weights: PairWeights,
    pairs: np.ndarray,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int,
    seed: int,
    matmul_dtype: torch.dtype | None = None,
    points: str = defaults.POINTS,
    **_,
) -> Conditionals:
    """What `conditionals` gives, for pairs leave_one_out already weighted: `pairs` (P,) their
    indices in `weights`; x, mask (P, F) each pair's record as it was measured. The points are
    the proposal's mean + std x the same shared noise, and the weights are those the
    contribution summed, so only the feature's own head is evaluated."""
    out = Conditionals.empty(len(pairs))
    if len(pairs) == 0:
        return out
    eps = noise(k, model.config.latent_dim, seed, IWAE_STREAM, points)
    index = torch.from_numpy(np.asarray(pairs)).to(weights.mean.device)
    proposal = Posterior(weights.mean[index], weights.log_var[index])
    with torch.inference_mode(), matmul_autocast(x.device.type, matmul_dtype):
        z = reparameterise(proposal, eps)  # (K, P, D)
        _mix_features(model, z, weights.log_w[:, index], x, mask, weights.feature[index], out,
                      np.arange(len(pairs)))  # fmt: skip
    return out


def _mix_features(model, z, log_w, x, mask, feature, out: Conditionals, rows: np.ndarray):
    """Fill `out`'s `rows` for pairs with points z (K, n, D), log-weights log_w (K, n) of
    p(x_-j, z_k), records x, mask (n, F) and features (n,): one feature's head at a time."""
    for j in torch.unique(feature).tolist():
        at = torch.nonzero(feature == j).flatten()
        dist = model.decoder.distribution(z[:, at], j)
        values = x[at, j].to(torch.float64)
        _mix(dist, log_w[:, at], values, mask[at, j], out, rows[at.cpu().numpy()])


def _mix(
    dist: FeatureDistribution,
    log_w: torch.Tensor,
    values: torch.Tensor,
    observed: torch.Tensor,
    out: Conditionals,
    rows: np.ndarray,
) -> None:
    """Fill `out`'s `rows` from one feature's heads at the K points of its pairs: log_w (K, n)
    unnormalised log-weights of p(x_-j, z_k), values and observed (n,)."""
    weights = torch.softmax(log_w, 0)
    if dist.missing_logit is not None:  # the value given that it is observed
        missing = dist.missing_logit.to(torch.float64)
        out.p_missing[rows] = (weights * torch.sigmoid(missing)).sum(0).cpu().numpy()
        weights = torch.softmax(log_w + torch.nn.functional.logsigmoid(-missing), 0)
    elif dist.unseen_log_prob < 0:  # never missing in training: the constant the score charged
        out.p_missing[rows] = math.exp(dist.unseen_log_prob)
    if dist.kind is FeatureKind.CONTINUOUS:
        mean, std = dist.mean.to(torch.float64), torch.exp(0.5 * dist.log_var.to(torch.float64))
        atom = None
        if dist.atom_logit is not None:
            atom = (dist.atom, torch.sigmoid(dist.atom_logit.to(torch.float64)))
        out.quantiles[rows] = _quantiles(weights, mean, std, atom, LEVELS).T.cpu().numpy()
        cdf = _cdf(weights, mean, std, atom, values)
        out.cdf[rows] = torch.where(observed, cdf, math.nan).cpu().numpy()
        return
    if dist.kind is FeatureKind.BOOLEAN:
        p_true = (weights * torch.sigmoid(dist.logit.to(torch.float64))).sum(0)
        probs = torch.stack([1.0 - p_true, p_true], 1)  # classes 0 (false) and 1 (true)
    else:
        log_probs = dist.log_probs.to(torch.float64)  # (K, n, V)
        probs = torch.logsumexp(torch.log(weights)[..., None] + log_probs, 0).exp()
    codes = values.long().clamp(0, probs.shape[1] - 1)
    mine = probs.gather(1, codes[:, None]).squeeze(1)
    likelier = torch.where(probs > mine[:, None], probs, 0.0).sum(1)
    out.p_observed[rows] = torch.where(observed, mine, math.nan).cpu().numpy()
    out.usual[rows] = (observed & (likelier < CREDIBLE)).cpu().numpy()
    top = torch.topk(probs, min(LIKELY, probs.shape[1]), dim=1)
    out.likely[rows, : top.indices.shape[1]] = top.indices.cpu().numpy()
    out.likely_p[rows, : top.values.shape[1]] = top.values.cpu().numpy()


def _cdf(weights, mean, std, atom, t: torch.Tensor) -> torch.Tensor:
    """The mixture's CDF at t (..., n): sum_k w_k [pi_k 1(t >= a) + (1 - pi_k) Phi((t - m_k) /
    s_k)], the K components on the first axis of weights, mean and std ((K, n))."""
    t = t[None]  # (1, ..., n)
    shape = (weights.shape[0],) + (1,) * (t.dim() - 2) + (weights.shape[1],)
    mean, std, weights = mean.view(shape), std.view(shape), weights.view(shape)
    gauss = 0.5 * torch.erfc((mean - t) / (std * math.sqrt(2.0)))  # (K, ..., n)
    if atom is not None:
        value, pi = atom[0], atom[1].view(shape)
        gauss = pi * (t >= value).to(gauss.dtype) + (1.0 - pi) * gauss
    return (weights * gauss).sum(0)


def _density(weights, mean, std, t: torch.Tensor) -> torch.Tensor:
    """The mixture's density at t (..., n) off its point mass: sum_k w_k (1 - pi_k) N(t; m_k,
    s_k^2), with (1 - pi_k) folded into `weights` by the caller."""
    t = t[None]
    shape = (weights.shape[0],) + (1,) * (t.dim() - 2) + (weights.shape[1],)
    mean, std, weights = mean.view(shape), std.view(shape), weights.view(shape)
    z = (t - mean) / std
    return (weights * torch.exp(-0.5 * z * z) / (std * math.sqrt(2.0 * math.pi))).sum(0)


def _quantiles(weights, mean, std, atom, levels) -> torch.Tensor:
    """The mixture's quantiles at `levels`, (L, n): the least t with CDF(t) >= level. A level
    inside the point mass's jump is the point mass itself; any other lies where the CDF is
    smooth, found by Newton's method from the moment-matched Gaussian's quantile, inside a
    bracket that holds every component's mass (24 standard deviations of the widest) and
    shrinks with each step: a step leaving it is a bisection instead. Stops when every level
    is met to TOLERANCE, or after BISECTIONS steps."""
    level = torch.tensor(levels, dtype=mean.dtype, device=mean.device)[:, None]  # (L, 1)
    low = (mean - 12.0 * std).min(0).values.expand(len(levels), -1)
    high = (mean + 12.0 * std).max(0).values.expand(len(levels), -1)
    smooth = weights
    at_atom = torch.zeros_like(low, dtype=torch.bool)
    if atom is not None:
        value, pi = atom
        smooth = weights * (1.0 - pi)  # the Gaussians' share of each component
        point = torch.full_like(low, value)
        before = _cdf(smooth, mean, std, None, point[0])  # the Gaussians' mass below the atom
        after = before + (weights * pi).sum(0)
        at_atom = (before < level) & (level <= after)
        low = torch.where(level > after, torch.maximum(low, point), low)  # above the mass
        high = torch.where(level <= before, torch.minimum(high, point), high)  # below it
    centre = (weights * mean).sum(0)
    spread = ((weights * (std * std + mean * mean)).sum(0) - centre * centre).clamp_min(1e-300)
    normal = torch.tensor([NormalDist().inv_cdf(q) for q in levels], dtype=mean.dtype,
                          device=mean.device)[:, None]  # fmt: skip
    t = torch.minimum(torch.maximum(centre + spread.sqrt() * normal, low), high)
    for _ in range(BISECTIONS):
        gap = _cdf(weights, mean, std, atom, t) - level
        done = (gap.abs() <= TOLERANCE) | at_atom
        if bool(done.all()):
            break
        low, high = torch.where(gap < 0, t, low), torch.where(gap < 0, high, t)
        step = t - gap / _density(smooth, mean, std, t)
        inside = torch.isfinite(step) & (step > low) & (step < high)
        t = torch.where(done, t, torch.where(inside, step, 0.5 * (low + high)))
    if atom is not None:
        t = torch.where(at_atom, torch.full_like(t, atom[0]), t)
    return t
