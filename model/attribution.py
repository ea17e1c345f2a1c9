"""Attribution: which features made a record unusual. Each feature's -log p(x_j|z), averaged
under the self-normalised importance weights (model/estimators.py), is measured against its
median on the calibration rows (its baseline); `top_features` lists those most above it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vaewatch.model.contract import TOP_FEATURE_TYPE


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


def top_features(
    feature_nll: np.ndarray, baseline: np.ndarray, names: list[str], n: int
) -> pa.ListArray:
    """Per record, up to n features whose -log p(x_j|z) most exceeds its calibration median,
    largest first; only features above their baseline are listed (a missing feature never is).
    Built as one Arrow list<struct<feature, contribution>> array, no per-row Python."""
    top, values, keep = top_indices(feature_nll, baseline, n)
    offsets = np.zeros(top.shape[0] + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=offsets[1:])
    entries = pa.StructArray.from_arrays(
        [pa.array(names, type=pa.string()).take(pa.array(top[keep])), pa.array(values[keep])],
        fields=list(TOP_FEATURE_TYPE.value_type),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), entries, type=TOP_FEATURE_TYPE)
