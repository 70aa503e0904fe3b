"""Per-sample loss terms with input checks that name the problem."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_class_targets(logits: Tensor, targets: Tensor) -> None:
    """Raise a ``ValueError`` naming the problem if ``targets`` cannot index the classes of ``logits``."""
    if targets is None:
        raise ValueError("this objective needs labels, but the batch has no targets")
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)}; "
                         "expected one class index per sample")
    if targets.dtype.is_floating_point:
        raise ValueError(f"class targets must be integers, got {targets.dtype}")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= logits.shape[1]:
        bad = hi if hi >= logits.shape[1] else lo
        raise ValueError(f"labels out of range: found label {bad}, but the model outputs {logits.shape[1]} classes "
                         f"(valid labels are 0..{logits.shape[1] - 1})")


def cross_entropy_terms(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy, shape ``(batch,)``, after checking shapes and label range.

    Example:
        >>> cross_entropy_terms(torch.zeros(2, 4), torch.tensor([0, 3])).tolist()  # doctest: +ELLIPSIS
        [1.386..., 1.386...]
    """
    if not torch.is_tensor(logits):
        raise TypeError(f"the model returned a {type(logits).__name__}, not a logits tensor; make its forward return "
                        "the (batch, classes) logits (e.g. return out[0], or out.logits for a Hugging Face model), "
                        "or pass a loss_fn that reads what it returns")
    check_class_targets(logits, targets)
    if targets.dtype != torch.long:  # int32/uint8 labels: cross-entropy needs int64 class indices
        targets = targets.long()
    return F.cross_entropy(logits, targets, reduction="none")


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN or infinite; the message names where it happened."""


def ensure_finite(value: Tensor, what: str) -> Tensor:
    if not torch.isfinite(value).all():
        flat = value.detach().flatten()
        bad = flat[~torch.isfinite(flat)]
        where = "" if flat.numel() == 1 else f" ({bad.numel()} of {flat.numel()} values)"
        raise NonFiniteLossError(f"{what} is not finite{where}: {bad[:4].tolist()}. "
                                 "Lower the learning rate, check the inputs for NaNs or infs, or clip gradients.")
    return value
