"""Small metrics with no scikit-learn dependency."""

from __future__ import annotations

import numpy as np


def auroc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` labels (ties count one half).

    Returns ``nan`` when one class is absent.

    Example:
        >>> auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False])
        1.0
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty_like(s)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(logits, targets) -> float:
    return float((np.asarray(logits).argmax(-1) == np.asarray(targets)).mean())
