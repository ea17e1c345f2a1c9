"""The reductions of the importance weights over the sample axis that run chunk by chunk: a
running log-sum-exp, each independent replicate's log-sum at its own scale, and the standard
error from the replicates' spread (model/estimators.py, model/attribution.py)."""

from __future__ import annotations

import math

import torch


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
