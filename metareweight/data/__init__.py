"""Batches, indexed datasets, label noise and offline dataset loaders."""

from .batch import Batch, as_batch
from .indexed import IndexedDataset, MissingIndexWarning, TensorIndexedDataset, WithIndex, with_index
from .noise import long_tailed_indices, pair_noise, symmetric_noise

__all__ = ["Batch", "as_batch", "IndexedDataset", "TensorIndexedDataset", "with_index", "WithIndex",
           "MissingIndexWarning", "symmetric_noise", "pair_noise",
           "long_tailed_indices"]
