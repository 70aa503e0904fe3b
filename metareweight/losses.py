"""Per-sample loss terms with input checks that name the problem.

Losses receive *logits*: the trainer and the hypergradient methods unwrap a Hugging Face ``ModelOutput`` to its
``logits`` before any loss sees it (:mod:`metareweight.models`). A custom ``loss_fn(logits, targets)`` returns one
term per sample, shape ``(batch,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_class_targets(logits: Tensor, targets: Tensor) -> None:
    """Raise a ``ValueError`` naming the problem if ``targets`` cannot index the classes of ``logits``."""
    if targets is None:
        raise ValueError("this objective needs labels, but the batch has no targets (a 'labels', 'y' or 'targets' "
                         "field, or the second item of a tuple batch)")
    check_logits(logits)
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)}; "
                         "expected one class index per sample")
    if targets.dtype.is_floating_point:
        raise ValueError(f"class targets must be integers, got {targets.dtype}; for regression give the objective "
                         "a loss_fn, e.g. loss_fn=metareweight.losses.mse_terms")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= logits.shape[1]:
        bad = hi if hi >= logits.shape[1] else lo
        raise ValueError(f"labels out of range: found label {bad}, but the model outputs {logits.shape[1]} classes "
                         f"(valid labels are 0..{logits.shape[1] - 1})")


def check_logits(output) -> None:
    """Raise a ``TypeError`` if a model output reached a loss as something other than a tensor of logits."""
    if not isinstance(output, Tensor):
        raise TypeError(f"the model returned a {type(output).__name__}, not a logits tensor; make its forward return "
                        "the (batch, classes) logits or an object with .logits (a Hugging Face ModelOutput; e.g. "
                        "return out[0]), or pass the objective a loss_fn(outputs, targets) that reads what it returns")


def mse_terms(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample squared error for regression, shape ``(batch,)`` (outputs ``(batch,)`` or ``(batch, 1)``, or
    ``(batch, d)`` summed over ``d``).

    Example:
        >>> mse_terms(torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 2.0])).tolist()
        [1.0, 0.0]
    """
    check_logits(outputs)
    if targets is None:
        raise ValueError("the squared error needs targets, but the batch has none")
    targets = targets.to(outputs.dtype)
    if outputs.dim() == 2 and outputs.shape[1] == 1 and targets.dim() == 1:
        outputs = outputs.squeeze(1)
    if outputs.shape != targets.shape:
        raise ValueError(f"outputs of shape {tuple(outputs.shape)} do not match targets of shape "
                         f"{tuple(targets.shape)}")
    sq = (outputs - targets) ** 2
    return sq.reshape(sq.shape[0], -1).sum(1)


def cross_entropy_terms(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy, shape ``(batch,)``, after checking shapes and label range.

    Example:
        >>> cross_entropy_terms(torch.zeros(2, 4), torch.tensor([0, 3])).tolist()  # doctest: +ELLIPSIS
        [1.386..., 1.386...]
    """
    check_logits(logits)
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
