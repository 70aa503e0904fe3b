"""One shape for every batch: inputs, targets, per-sample index and any extra fields.

Loaders may yield ``(x, y)``, ``(x, y, index)`` or any mapping (a dict, or the ``BatchEncoding`` of Hugging Face's
``DataCollatorWithPadding``); :func:`as_batch` turns each into a :class:`Batch`. In a mapping:

- with an input key (``inputs``/``input``/``x``), that entry is the model input, ``targets``/``target``/``y``/
  ``labels``/``label`` the targets, ``index``/``idx``/``indices`` the sample index and everything else an extra;
- without one (the Hugging Face way; targets are then required), every entry but the targets and the index is a
  model input, passed to the model as keyword arguments (:mod:`metareweight.models`; keys its ``forward`` does not
  name are left out), and the entries that are not standard model inputs (``domain``, ``noisy``,
  ``teacher_logits``, ...) are also extras.

Example:
    >>> import torch
    >>> b = as_batch({"x": torch.zeros(4, 3), "y": torch.tensor([0, 1, 0, 1]), "index": torch.arange(4),
    ...               "domain": torch.tensor([0, 0, 1, 1])})
    >>> b.size, sorted(b.extras)
    (4, ['domain'])
    >>> hf = as_batch({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
    ...                "labels": torch.tensor([0, 1]), "idx": torch.tensor([7, 8]), "noisy": torch.tensor([0, 1])})
    >>> sorted(hf.inputs), hf.targets.tolist(), hf.index.tolist(), sorted(hf.extras)
    (['attention_mask', 'input_ids', 'noisy'], [0, 1], [7, 8], ['noisy'])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

INPUT_KEYS = ("inputs", "input", "x")
TARGET_KEYS = ("targets", "target", "y", "labels", "label")
INDEX_KEYS = ("index", "idx", "indices")
#: Hugging Face model inputs: in a batch without an input key they are model inputs only, never extras.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "head_mask",
                    "pixel_values", "pixel_mask", "input_values", "input_features", "decoder_input_ids",
                    "decoder_attention_mask", "special_tokens_mask", "length")


def _move(value: Any, device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    return value


@dataclass
class Batch:
    """A training or meta batch.

    Attributes:
        inputs: what the model is called with: a tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``); see :mod:`metareweight.models`.
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
    if isinstance(raw, Mapping):
        raw = dict(raw)  # a BatchEncoding is a Mapping but not a dict
        ik, tk, xk = _first(raw, INPUT_KEYS), _first(raw, TARGET_KEYS), _first(raw, INDEX_KEYS)
        targets, index = (raw[tk] if tk else None), (raw[xk] if xk else None)
        if ik is not None:
            return Batch(raw[ik], targets, index, {k: v for k, v in raw.items() if k not in (ik, tk, xk)})
        inputs = {k: v for k, v in raw.items() if k not in (tk, xk)}
        if not inputs or tk is None:
            raise ValueError(f"a dict batch needs an input key, one of {INPUT_KEYS}, or Hugging Face-style model "
                             f"inputs (input_ids, ...) beside targets under one of {TARGET_KEYS}; got keys "
                             f"{sorted(raw)}")
        return Batch(inputs, targets, index, {k: v for k, v in inputs.items() if k not in MODEL_INPUT_KEYS})
    if isinstance(raw, (list, tuple)):
        if len(raw) == 2:
            return Batch(raw[0], raw[1])
        if len(raw) == 3:
            return Batch(raw[0], raw[1], raw[2])
        raise ValueError(f"a tuple batch must be (inputs, targets) or (inputs, targets, index); got {len(raw)} items. "
                         "Yield a dict to pass extra fields.")
    if torch.is_tensor(raw):
        raise ValueError("the loader yields bare tensors without labels; yield (inputs, targets) or a dict")
    raise ValueError(f"cannot read a batch of type {type(raw).__name__}; yield (inputs, targets[, index]) or a "
                     "mapping (a dict, or a Hugging Face BatchEncoding)")
