"""Label corruption with a record of which samples were corrupted (the ground truth for weight analysis)."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def _check(labels: np.ndarray, rate: float, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return labels


def symmetric_noise(labels, rate: float, num_classes: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Flip a ``rate`` fraction of labels, each to a uniformly chosen *other* class.

    Returns ``(noisy_labels, flipped)`` where ``flipped`` is a boolean mask.

    Example:
        >>> y, f = symmetric_noise(np.zeros(10, int), 0.3, 3, seed=0)
        >>> int(f.sum()), bool((y[f] != 0).all())
        (3, True)
    """
    labels = _check(labels, rate, num_classes)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(labels.shape[0], bool)
    flipped[rng.permutation(labels.shape[0])[: int(round(rate * labels.shape[0]))]] = True
    noisy = labels.copy()
    shift = rng.integers(1, num_classes, size=int(flipped.sum()))
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped


def pair_noise(labels, rate: float, num_classes: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Flip a ``rate`` fraction of labels to the next class (``c → c+1 mod C``), the "pair-flip" benchmark noise."""
    labels = _check(labels, rate, num_classes)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(labels.shape[0], bool)
    flipped[rng.permutation(labels.shape[0])[: int(round(rate * labels.shape[0]))]] = True
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + 1) % num_classes
    return noisy, flipped


def long_tailed_indices(labels, imbalance: float, seed: int = 0) -> np.ndarray:
    """Indices of a long-tailed subset: class ``c`` (sorted by id) keeps ``n_max · imbalance^(−c/(C−1))`` samples."""
    labels = np.asarray(labels)
    if imbalance < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    n_max = min(int((labels == c).sum()) for c in classes)
    keep = []
    for i, c in enumerate(classes):
        n = max(1, int(n_max * imbalance ** (-i / max(len(classes) - 1, 1))))
        keep.append(rng.permutation(np.flatnonzero(labels == c))[:n])
    return np.sort(np.concatenate(keep))
