"""Datasets that carry each sample's index, so learned weights can be tracked per sample."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wrap a map-style dataset of ``(x, y)`` so each item is a dict with ``x``, ``y``, ``index`` (+ extras).

    Example:
        >>> ds = IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> ds[2]["index"]
        2
    """

    def __init__(self, dataset: Dataset, extras: Optional[Dict[str, Any]] = None):
        self.dataset = dataset
        self.extras = extras or {}
        for k, v in self.extras.items():
            if len(v) != len(dataset):
                raise ValueError(f"extra field {k!r} has {len(v)} entries but the dataset has {len(dataset)}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        x, y = self.dataset[i]
        item = {"x": x, "y": y, "index": i}
        for k, v in self.extras.items():
            item[k] = v[i]
        return item


class TensorIndexedDataset(Dataset):
    """Tensors ``x``, ``y`` (and extras) served as dicts with an ``index``; fast and picklable."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, **extras: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        for k, v in extras.items():
            if len(v) != len(x):
                raise ValueError(f"extra field {k!r} has {len(v)} rows but x has {len(x)}")
        self.x, self.y, self.extras = x, y, extras

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = {"x": self.x[i], "y": self.y[i], "index": i}
        for k, v in self.extras.items():
            item[k] = v[i]
        return item
