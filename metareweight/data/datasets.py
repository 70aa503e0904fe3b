"""Offline dataset loaders. Nothing here downloads: data ships inside installed packages or is generated."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .noise import pair_noise, symmetric_noise


@dataclass
class NoisySplit:
    """Train (noisy labels + flags), clean meta and clean test tensors of one classification task."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    noisy: torch.Tensor
    y_train_clean: torch.Tensor
    x_meta: torch.Tensor
    y_meta: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def split_with_noise(x: np.ndarray, y: np.ndarray, *, noise: float, noise_kind: str = "symmetric",
                     meta_per_class: int = 10, test_fraction: float = 0.25, seed: int = 0) -> NoisySplit:
    """Stratified split into train/meta/test; label noise on the train split only.

    Example:
        >>> s = split_with_noise(np.random.rand(200, 3), np.arange(200) % 4, noise=0.5, meta_per_class=5)
        >>> s.x_meta.shape[0], round(float(s.noisy.float().mean()), 2)
        (20, 0.5)
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    num_classes = int(classes.max()) + 1
    test_idx, meta_idx, train_idx = [], [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        meta_idx.append(idx[n_test:n_test + meta_per_class])
        train_idx.append(idx[n_test + meta_per_class:])
    test_idx, meta_idx, train_idx = (rng.permutation(np.concatenate(a)) for a in (test_idx, meta_idx, train_idx))
    noise_fn = {"symmetric": symmetric_noise, "pair": pair_noise}.get(noise_kind)
    if noise_fn is None:
        raise ValueError(f"noise_kind must be 'symmetric' or 'pair', got {noise_kind!r}")
    y_noisy, flipped = noise_fn(y[train_idx], noise, num_classes, seed=seed + 1)
    t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    return NoisySplit(t(x[train_idx]), t(y_noisy, torch.long), t(flipped, torch.bool), t(y[train_idx], torch.long),
                      t(x[meta_idx]), t(y[meta_idx], torch.long), t(x[test_idx]), t(y[test_idx], torch.long),
                      num_classes)


def load_digits_arrays():
    """scikit-learn's bundled 8×8 digits as ``(x float32 (1797, 64) in [0, 1], y int64)``, 10 classes
    (``pip install scikit-learn``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from .text import MissingDataError
        raise MissingDataError("the digits data ship with scikit-learn: pip install scikit-learn "
                               "(or pip install 'metareweight[experiments]')") from None

    d = load_digits()
    return d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)


def noisy_digits(noise: float = 0.4, seed: int = 0, meta_per_class: int = 10, noise_kind: str = "symmetric"
                 ) -> NoisySplit:
    """Digits with label noise on the train split, a small clean meta set and a clean test set (a :class:`NoisySplit`).

    Example:
        >>> s = noisy_digits(noise=0.4, seed=0)
        >>> s.x_train.shape, s.x_meta.shape[0], round(float(s.noisy.float().mean()), 2)
        (torch.Size([1247, 64]), 100, 0.4)
    """
    x, y = load_digits_arrays()
    return split_with_noise(x, y, noise=noise, noise_kind=noise_kind, meta_per_class=meta_per_class, seed=seed)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_fashion_mnist(root: Optional[Path] = None):
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (60k train / 10k test, 28×28 uint8).

    Returns ``(x_train, y_train, x_test, y_test)`` as numpy arrays. Raises ``MissingDataError`` naming the package
    (``apt-get install dataset-fashion-mnist``, done by ``make test`` / ``scripts/install_data.sh``) if absent.
    """
    import gzip

    from .text import MissingDataError

    root = Path(root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not (root / "train-images-idx3-ubyte.gz").exists():
        raise MissingDataError(f"Fashion-MNIST not found in {root}: install the Debian package "
                               "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist)")

    def images(name):
        with gzip.open(root / name) as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)

    def labels(name):
        with gzip.open(root / name) as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=8).astype(np.int64)

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))
