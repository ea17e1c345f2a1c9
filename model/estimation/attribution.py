"""Attribution: which features made a record unusual, two ways, each measured against its
median on the calibration rows (its baseline); `top_features` lists the features most above it.

- Every record: each feature's -log p(x_j|z), averaged under the self-normalised importance
  weights (model/estimation/estimators.py). It costs nothing, but it is read under a posterior that
  every
  feature moved: a value far out of range drags z to where the decoder gets the *other*
  features wrong, and they are named instead of it.
- Flagged records (`leave_one_out`): -log p(x_j | x_-j), how unlikely each value is given the
  rest of the record, = log p(x_-j) - log p(x); the features after the first are measured
  with it left out too (`_chained`). One more encoder pass and one more pass of the K points
  per feature, so it is kept to the records `is_anomaly` flags, and to at most
  EXPLAINED_SHARE of a batch's records (`explained_rows`): on a day where most records are
  flagged (a column's units changed upstream) the rest keep the first kind, and scoring costs
  a bounded multiple of its usual time instead of up to 1 + MAX_LEAVE_ONE_OUT times it. A run
  at another K than the model's keeps the first kind for every record (model/scoring.py): the
  baseline of the second was taken at the model's K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vaewatch.model import defaults
from vaewatch.model.estimation.estimators import (
    IWAE_STREAM,
    matmul_autocast,
    running_log_sum_exp,
    weight_chunks,
)
from vaewatch.model.estimation.noise import noise
from vaewatch.model.network.vae import VAE

# at most this many features per flagged record get the leave-one-out term: all of them in a
# table this narrow, else those the cheap attribution ranks first (the cost is one pass of the
# K points per feature)
MAX_LEAVE_ONE_OUT = 16
# the features after the first are re-measured with the first left out too (`_chained`): these
# many, those next after it by the leave-one-out term (top_features lists at most 3 by default)
CHAINED = 4
# the leave-one-out term for at most this share of a batch's records (and at least MIN_EXPLAINED
# of them): the flagged rate the model was calibrated for (1 - q, 1 % by default) plus room for
# several percent of true anomalies; a day flagging more is one the drift check alarms on.
# Beyond it, the most anomalous of the flagged get it.
EXPLAINED_SHARE = 0.10
MIN_EXPLAINED = 64


@dataclass
class Explained:
    """What explain_flagged measured: the attribution to list, and which records it explains."""

    excess: np.ndarray  # (B, F): the contributions top_features lists from
    unexplained: int  # flagged records past the budget, listed by -log p(x_j|z)
    rows: np.ndarray  # (r,) the explained records' positions in the batch
    lead: np.ndarray  # (r,) each one's first feature, left out of the others' measurement
    # the (record, feature) pairs the two passes measured, with their points and weights:
    # each record's first feature in `first`, the ones after it (measured without it) in
    # `chained`; their records are positions among the explained ones. None: not kept.
    first: PairWeights | None = None
    chained: PairWeights | None = None


@dataclass
class PairWeights:
    """What leave_one_out's p(x_-j) was estimated from, per (record, feature) pair: the proposal
    q(z | x, x_j hidden) (widened) and the K log-weights log p(x_-j, z_k) - log q(z_k | ...),
    the points being mean + std x the shared noise. What the explanations mix over
    (model/estimation/conditionals.py), so they need no second pass over the same pairs."""

    record: torch.Tensor  # (P,) the pair's record (a row of the x leave_one_out was given)
    feature: torch.Tensor  # (P,)
    mean: torch.Tensor  # (P, D)
    log_var: torch.Tensor  # (P, D)
    log_w: torch.Tensor  # (K, P) float64

    def find(self, record: np.ndarray, feature: np.ndarray, features: int) -> np.ndarray:
        """The index of each (record, feature) pair among these (-1 where it is not one)."""
        key = self.record.cpu().numpy() * features + self.feature.cpu().numpy()
        wanted = np.asarray(record) * features + np.asarray(feature)
        if key.size == 0:
            return np.full(wanted.shape, -1, dtype=np.int64)
        order = np.argsort(key, kind="stable")
        at = np.minimum(np.searchsorted(key[order], wanted), key.size - 1)
        return np.where(key[order][at] == wanted, order[at], -1)


def leave_one_out(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    candidates: torch.Tensor,
    *,
    k: int,
    seed: int,
    log_std: torch.Tensor | None,
    proposal_scale: float,
    memory_budget: int,
    matmul_dtype: torch.dtype | None = None,
    points: str = defaults.POINTS,
    missing: bool = False,
    keep: bool = False,
):
    """(B, F) float64: -log p(x_j | x_-j) where `candidates` ((B, F) bool) and x_j is observed,
    NaN elsewhere; a continuous value's is a density in the data's units, like log_likelihood.
    With `missing`, a missing x_j whose absence the model charges for (`missing_measured`) is
    measured too: -log p(x_j missing | x_-j).

    log p(x) and each log p(x_-j) are IWAE estimates from the same K seeded points as the
    scores: p(x) with q(z|x) (the estimator's proposal), p(x_-j) with q(z | x, x_j hidden: the
    encoder reads it as missing) and feature j's terms (its value, its observation) left out of
    each weight. Each record's values depend on its own inputs alone, as the scores' do;
    `matmul_dtype` as in score_records. With `keep`, (that, the PairWeights of every measured
    pair)."""
    eps = noise(k, model.config.latent_dim, seed, IWAE_STREAM, points)
    wanted = candidates & (mask | missing_measured(model).to(mask.device) if missing else mask)
    out = torch.full(x.shape, math.nan, dtype=torch.float64, device=x.device)
    rows = torch.nonzero(wanted.any(1)).flatten()
    if rows.numel() == 0:
        if not keep:
            return out
        nothing = torch.zeros(0, dtype=torch.long, device=x.device)
        empty = torch.zeros(0, model.config.latent_dim, device=x.device)
        no_weights = torch.zeros(k, 0, dtype=torch.float64, device=x.device)
        return out, PairWeights(nothing, nothing, empty, empty, no_weights)
    x, mask, wanted = x[rows], mask[rows], wanted[rows]
    kept = []  # with `keep`: the pairs' proposal and log-weights

    def log_sum(xs, ms, drop: torch.Tensor | None) -> torch.Tensor:  # log sum_k w_k, per record
        """`drop`: (b,) the feature each record leaves out (hidden from the encoder, its terms
        out of every weight), or None."""
        hidden = ms if drop is None else ms.scatter(1, drop[:, None], False)
        proposal = model.encoder(xs, hidden).widened(proposal_scale)
        parts, weights = [], []
        for chunk in weight_chunks(model, xs, ms, eps, posterior=proposal,
                                   memory_budget=memory_budget):  # fmt: skip
            b = chunk.mask.shape[0]
            left_out = None if drop is None else drop[chunk.start : chunk.start + b]
            state, samples = None, []
            for s in chunk.samples:
                log_w = s.log_w.to(torch.float64)
                if left_out is not None:
                    lp = s.feature_lp.stacked()
                    index = left_out[None, :, None].expand(lp.shape[0], b, 1)
                    log_w = log_w - lp.gather(-1, index).squeeze(-1).to(torch.float64)
                    if keep:
                        samples.append(log_w)
                state = running_log_sum_exp(state, log_w)
            parts.append(state[0] + torch.log(state[1]))
            if samples:
                weights.append(torch.cat(samples))
        if keep and drop is not None:
            kept.extend([proposal, torch.cat(weights, dim=1)])
        return torch.cat(parts)

    with torch.inference_mode(), matmul_autocast(x.device.type, matmul_dtype):
        full = log_sum(x, mask, None)
        # every (record, feature) pair in one pass: a record repeated once per feature it leaves
        # out (one encoder call and one stream of weight chunks, not one per feature)
        at, j = torch.nonzero(wanted, as_tuple=True)
        value = log_sum(x[at], mask[at], j) - full[at]
        if log_std is not None:  # the Jacobian of x_j's units, for a value scored by a density
            density = model.decoder.density_mask(x, mask).to(torch.float64)  # (b, F_cont)
            jacobian = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            jacobian[: density.shape[1]] = log_std.to(torch.float64)
            scored = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
            scored[:, : density.shape[1]] = density
            value = value + scored[at, j] * jacobian[j]
        out[rows[at], j] = value
    if not keep:
        return out
    proposal, log_w = kept
    return out, PairWeights(rows[at], j, proposal.mean, proposal.log_var, log_w)


def missing_measured(model: VAE) -> torch.Tensor:
    """(F,) bool: the features whose missing value has a probability under the model: those
    whose observation is modelled, and those never missing in training (charged a constant);
    not those whose missing values are marginalised (they cost nothing)."""
    c = model.config
    out = torch.zeros(c.n_features, dtype=torch.bool)
    out[c.missing_features] = True
    if c.missing_log_prob:
        out |= torch.tensor(c.missing_log_prob) < 0
    return out


def missing_baseline(missing_share: list[float]) -> np.ndarray:
    """(F,) the baseline of a missing value's -log p(missing | x_-j): -log of the feature's
    missing share in training, so a value missing as often as it was in training is not listed,
    and 0 for a feature never missing then (any missing value of it is unusual)."""
    share = np.asarray(missing_share, dtype=np.float64)
    return np.where(share > 0, -np.log(np.where(share > 0, share, 1.0)), 0.0)


def top_indices(feature_nll: np.ndarray, baseline: np.ndarray, n: int):
    """(top (B, n) feature indices by excess over the baseline, largest first; their excesses;
    which of them are listed: those above the baseline)."""
    excess = np.asarray(feature_nll, dtype=np.float64) - np.asarray(baseline)[None, :]
    n = min(n, excess.shape[1])
    if n <= 8 and 4 * n < excess.shape[1]:
        # n passes of argmax, each taking the largest left: argmax returns the first of equal
        # values, so this is the stable sort's order (largest first, ties by feature index)
        # at ~1/15 of its cost on 320 features; rows holding inf or NaN take the sort itself
        work, rows = excess.copy(), np.arange(excess.shape[0])
        top = np.empty((excess.shape[0], n), dtype=np.int64)
        for i in range(n):
            top[:, i] = pick = work.argmax(axis=1)
            work[rows, pick] = -np.inf
        odd = ~np.isfinite(excess).all(axis=1)
        if odd.any():
            top[odd] = np.argsort(-excess[odd], axis=1, kind="stable")[:, :n]
    else:
        top = np.argsort(-excess, axis=1, kind="stable")[:, :n]
    values = np.take_along_axis(excess, top, axis=1)
    return top, values, values > 0


def explained_rows(flagged: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """The positions of the flagged records that get the leave-one-out term: all of them while
    they are at most max(MIN_EXPLAINED, EXPLAINED_SHARE x the batch's records), else that many
    with the highest `priority` (the anomaly score; ties by position), in position order."""
    rows = np.flatnonzero(flagged)
    limit = max(MIN_EXPLAINED, math.ceil(EXPLAINED_SHARE * len(flagged)))
    if rows.size <= limit:
        return rows
    order = np.argsort(-np.asarray(priority, dtype=np.float64)[rows], kind="stable")
    return np.sort(rows[order[:limit]])


def explain_flagged(
    model: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    excess: np.ndarray,
    flagged: np.ndarray,
    conditional_baseline: np.ndarray,
    priority: np.ndarray,
    missing_baseline: np.ndarray | None = None,
    **estimator,
):
    """An `Explained`: `excess` ((B, F), the cheap
    attribution's excess over its baseline) with the rows of the flagged records
    `explained_rows` picks replaced by their leave-one-out excess over `conditional_baseline`;
    how many flagged records kept the cheap one; which were explained and each one's first
    feature. A replaced row holds its MAX_LEAVE_ONE_OUT candidates (the cheap attribution's
    first) above the baseline or not, every other feature -inf (never listed). With
    `missing_baseline` ((F,), `missing_baseline`), missing values whose absence the model
    charges for are candidates too, measured against it. `estimator`: leave_one_out's k, seed,
    log_std, proposal_scale, memory_budget, matmul_dtype and points."""
    rows = explained_rows(flagged, priority)
    left = int(np.count_nonzero(flagged)) - rows.size
    if rows.size == 0:
        return Explained(excess, left, rows, np.zeros(0, dtype=np.int64))
    part = excess[rows]
    candidates = np.ones(part.shape, dtype=bool)
    if part.shape[1] > MAX_LEAVE_ONE_OUT:
        top, _, _ = top_indices(part, np.zeros(part.shape[1]), MAX_LEAVE_ONE_OUT)
        candidates[:] = False
        np.put_along_axis(candidates, top, True, axis=1)
    index = torch.from_numpy(rows).to(x.device)
    x, mask = x[index], mask[index]
    wanted = torch.from_numpy(candidates).to(x.device)
    measure = missing_baseline is not None
    conditional, first_weights = leave_one_out(
        model, x, mask, wanted, missing=measure, keep=True, **estimator
    )
    conditional = conditional.cpu().numpy()
    baseline = np.broadcast_to(np.asarray(conditional_baseline, dtype=np.float64), part.shape)
    if measure:
        baseline = np.where(mask.cpu().numpy(), baseline, np.asarray(missing_baseline)[None, :])
    first = np.where(np.isnan(conditional), -np.inf, conditional - baseline)
    out = excess.copy()
    out[rows], lead, chained = _chained(model, x, mask, first, baseline, measure, **estimator)
    return Explained(out, left, rows, lead, first_weights, chained)


def _chained(model, x, mask, first: np.ndarray, baseline, missing: bool, **estimator):
    """((r, F): each record's first feature (the largest leave-one-out excess, `first`) as it
    is; the CHAINED features next after it re-measured without it, -log p(x_j | x_-{first, j})
    over the same `baseline` ((r, F)); every other feature -inf. (r,): that first feature. The
    re-measured pairs' PairWeights.)
    Without this a value far out of range stays in x_-j for every other j and drags their
    conditionals with it: the demo's out-of-range records listed latency_ms and hour after the
    amount, at millions of nats each."""
    at = np.arange(first.shape[0])
    lead = first.argmax(axis=1)
    rest = first.copy()
    rest[at, lead] = -np.inf
    top, values, _ = top_indices(rest, np.zeros(first.shape[1]), CHAINED)
    candidates = np.zeros(first.shape, dtype=bool)
    np.put_along_axis(candidates, top, np.isfinite(values), axis=1)
    without = mask.clone()
    without[torch.from_numpy(at).to(mask.device), torch.from_numpy(lead).to(mask.device)] = False
    wanted = torch.from_numpy(candidates).to(x.device)
    # the first feature is hidden now, not missing: its absence is not measured
    wanted[torch.from_numpy(at).to(x.device), torch.from_numpy(lead).to(x.device)] = False
    second, weights = leave_one_out(
        model, x, without, wanted, missing=missing, keep=True, **estimator
    )
    out = np.where(np.isnan(second.cpu().numpy()), -np.inf, second.cpu().numpy() - baseline)
    out[at, lead] = first[at, lead]
    return out, lead, weights


def conditional_baseline(
    model: VAE, x: torch.Tensor, mask: torch.Tensor, **estimator
) -> np.ndarray:
    """Each feature's median -log p(x_j | x_-j) over the records (x, mask), where observed:
    `explain_flagged`'s baseline (0 for a feature never observed). `estimator`: as there."""
    every = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    values = leave_one_out(model, x, mask, every, **estimator).cpu().numpy()
    return np.array([np.median(c[~np.isnan(c)]) if (~np.isnan(c)).any() else 0.0 for c in values.T])
