"""Where a trainer's meta batches come from: a meta loader, or the training set sampled with replacement.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from metareweight import MetaWeightNet, TensorIndexedDataset
    >>> ds = TensorIndexedDataset(torch.randn(6, 2), torch.tensor([0, 1] * 3))
    >>> stream = MetaStream(meta_source(MetaWeightNet(), DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=4)))
    >>> [stream.next().size for _ in range(3)], stream.passes
    ([4, 2, 4], 2)
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from torch.utils.data import DataLoader, RandomSampler

from . import checkpoint as ckpt
from .data.batch import Batch, as_batch

__all__ = ["MetaStream", "meta_source"]


class MetaStream:
    """Endless meta batches from a loader, restarting it when exhausted; an empty loader is an error.
    Each pass is an "epoch" of the loader's sampler; the position is saved in checkpoints."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.position = ckpt.LoaderPosition(loader)
        self.passes = 0

    def next(self) -> Batch:
        for attempt in range(2):
            if not self.position.active:
                self.position.start(epoch=self.passes)
                self.passes += 1
            try:
                return as_batch(next(self.position))
            except StopIteration:
                pass
        raise ValueError("the meta loader yielded no batches; give it at least one sample "
                         "(check its dataset size and drop_last)")

    def state_dict(self) -> Dict[str, Any]:
        return {"position": self.position.state_dict(), "passes": self.passes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.passes = state["passes"]
        self.position.load_state_dict(state["position"])


def meta_source(objective, train_loader: Iterable, meta_loader: Optional[Iterable]) -> Iterable:
    """``meta_loader``, or for an objective with ``meta_data="train"`` the training set sampled with replacement
    (same batch size and collation)."""
    if meta_loader is not None:
        return meta_loader
    if objective.meta_data == "loader":
        raise ValueError(f"{type(objective).__name__} needs a meta_loader (its meta batches come from "
                         "separate meta data)")
    if not isinstance(train_loader, DataLoader):
        raise ValueError("meta batches sampled from the training set need train_loader to be a DataLoader")
    sampler = RandomSampler(train_loader.dataset, replacement=True, num_samples=10 ** 9)
    return DataLoader(train_loader.dataset, batch_size=train_loader.batch_size, sampler=sampler,
                      collate_fn=train_loader.collate_fn, num_workers=0)
