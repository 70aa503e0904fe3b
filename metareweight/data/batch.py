"""One shape for every batch: inputs, targets, per-sample index and any extra fields.

Loaders may yield ``(x, y)``, ``(x, y, index)`` or dicts; :func:`as_batch` turns each into a :class:`Batch`.

Example:
    >>> import torch
    >>> b = as_batch({"x": torch.zeros(4, 3), "y": torch.tensor([0, 1, 0, 1]), "index": torch.arange(4),
    ...               "domain": torch.tensor([0, 0, 1, 1])})
    >>> b.size, sorted(b.extras)
    (4, ['domain'])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional

import torch
from torch import Tensor

INPUT_KEYS = ("inputs", "input", "x")
TARGET_KEYS = ("targets", "target", "y", "labels", "label")
INDEX_KEYS = ("index", "idx", "indices")


def _move(value: Any, device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    return value


@dataclass
class Batch:
    """A training or meta batch.

    Attributes:
        inputs: what the model is called with (a tensor, or a tuple/dict of them).
        targets: labels or regression targets, or ``None``.
        index: per-sample ids in the dataset (used to track weights), or ``None``.
        extras: any other per-sample fields (domain ids, noise flags, teacher logits, ...).
    """

    inputs: Any
    targets: Optional[Tensor] = None
    index: Optional[Tensor] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        for value in (self.targets, self.index, self.inputs):
            if torch.is_tensor(value):
                return int(value.shape[0])
        first = self.inputs[0] if isinstance(self.inputs, (list, tuple)) else next(iter(self.inputs.values()))
        return int(first.shape[0])

    def to(self, device) -> "Batch":
        return replace(self, inputs=_move(self.inputs, device), targets=_move(self.targets, device),
                       index=_move(self.index, device), extras=_move(self.extras, device))


def _first(d: Dict[str, Any], keys) -> Optional[str]:
    return next((k for k in keys if k in d), None)


def as_batch(raw: Any) -> Batch:
    """Turn what a DataLoader yields into a :class:`Batch` (see module docs for accepted shapes)."""
    if isinstance(raw, Batch):
        return raw
    if isinstance(raw, dict):
        ik = _first(raw, INPUT_KEYS)
        if ik is None:
            raise ValueError(f"a dict batch needs an input key, one of {INPUT_KEYS}; got keys {sorted(raw)}")
        tk, xk = _first(raw, TARGET_KEYS), _first(raw, INDEX_KEYS)
        extras = {k: v for k, v in raw.items() if k not in (ik, tk, xk)}
        return Batch(raw[ik], raw.get(tk) if tk else None, raw.get(xk) if xk else None, extras)
    if isinstance(raw, (list, tuple)):
        if len(raw) == 2:
            return Batch(raw[0], raw[1])
        if len(raw) == 3:
            return Batch(raw[0], raw[1], raw[2])
        raise ValueError(f"a tuple batch must be (inputs, targets) or (inputs, targets, index); got {len(raw)} items. "
                         "Yield a dict to pass extra fields.")
    if torch.is_tensor(raw):
        raise ValueError("the loader yields bare tensors without labels; yield (inputs, targets) or a dict")
    raise ValueError(f"cannot read a batch of type {type(raw).__name__}; yield (inputs, targets[, index]) or a dict")
