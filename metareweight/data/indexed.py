"""Datasets that carry each sample's index, so learned weights can be tracked per sample."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional

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


class MissingIndexWarning(UserWarning):
    """Batches carry no sample index, so weights cannot be tracked per sample."""


def check_index(batch, needs_index: bool = False) -> None:
    """Warn (once per call site) when ``batch`` has no sample index; raise when one is needed (``noisy=`` flags).

    Example:
        >>> from metareweight.data import Batch
        >>> check_index(Batch(torch.zeros(2, 1), torch.zeros(2), None), needs_index=True)
        Traceback (most recent call last):
        ...
        ValueError: MetaTrainer(noisy=...) flags samples by their dataset index, but the batches carry none; ...
    """
    if batch.index is not None:
        return
    fix = ("wrap the dataset with metareweight.with_index(dataset) (or yield an 'index' field) so every batch "
           "carries each sample's position in the dataset")
    if needs_index:
        raise ValueError("MetaTrainer(noisy=...) flags samples by their dataset index, but the batches carry none; "
                         + fix)
    warnings.warn("the batches carry no sample index: weights are recorded under index -1 and cannot be followed "
                  "per sample (weights_history, weight AUROC); " + fix, MissingIndexWarning, stacklevel=3)


class WithIndex(Dataset):
    """A map-style dataset whose items also carry their position ``index`` (see :func:`with_index`)."""

    def __init__(self, dataset: Any, key: str = "index"):
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            return {**item, self.key: i}
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return (item[0], item[1], i)
        size = f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
        raise ValueError(f"with_index needs items that are mappings (dicts, tokenizer outputs) or (x, y) pairs; item "
                         f"{i} is a {type(item).__name__}{size}")


def with_index(dataset: Any, key: str = "index") -> Any:
    """``dataset`` with each sample's position added as ``key``, so learned weights can be followed per sample.

    Works on any map-style dataset (``len`` and integer indexing) whose items are mappings (a tokenised text
    dataset, as fed to ``DataCollatorWithPadding``) or ``(x, y)`` pairs (which become ``(x, y, index)``). A
    Hugging Face ``datasets.Dataset`` (anything with ``add_column`` and ``column_names``) gets a new column
    instead, so its format and ``map``/``filter`` keep working. Compute the noise flags you pass as
    ``MetaTrainer(noisy=...)`` in the same order.

    Example:
        >>> ds = with_index([{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}])
        >>> ds[1]
        {'input_ids': [7], 'label': 0, 'index': 1}
        >>> with_index(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))[2][2]
        2
    """
    if hasattr(dataset, "add_column") and hasattr(dataset, "column_names"):
        if key in dataset.column_names:
            return dataset
        return dataset.add_column(key, list(range(len(dataset))))
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"with_index needs a map-style dataset (len() and dataset[i]), got {type(dataset).__name__}; "
                        "an iterable dataset has no stable positions: yield an 'index' field yourself")
    return WithIndex(dataset, key)
