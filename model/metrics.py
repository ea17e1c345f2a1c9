"""Detection metrics shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pooled_standardised_difference(values: list, errors: list) -> float:
    """How honest a standard error is: the root mean square, over records and over pairs of
    runs, of (a - b) / sqrt(se_a^2 + se_b^2), runs 0 and 1 paired, then 2 and 3, and so on
    (each run's per-record values and standard errors). 1 where the errors are right. Every
    record of a run shares its seed's points, so one pair is one draw of the whole table's
    errors: pool several."""
    a, b = np.asarray(values[0::2], dtype=np.float64), np.asarray(values[1::2], dtype=np.float64)
    se_a = np.asarray(errors[0::2], dtype=np.float64)
    se_b = np.asarray(errors[1::2], dtype=np.float64)
    z = (a - b) / np.hypot(se_a, se_b)
    return float(np.sqrt(np.mean(z**2)))
