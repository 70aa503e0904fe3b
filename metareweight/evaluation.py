"""``evaluate``: a model's mean loss and accuracy on a loader (what ``MetaTrainer`` reports as ``eval_*``).

Example:
    >>> import torch
    >>> from metareweight import TensorIndexedDataset
    >>> from torch.utils.data import DataLoader
    >>> _ = torch.manual_seed(0)
    >>> ds = TensorIndexedDataset(torch.randn(32, 5), torch.randint(0, 3, (32,), dtype=torch.int32))
    >>> sorted(evaluate(torch.nn.Linear(5, 3), DataLoader(ds, batch_size=8)))
    ['accuracy', 'loss']
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from .core.strategy import Collectives
from .data.batch import as_batch
from .losses import cross_entropy_terms, mse_terms
from .models import model_forward
from .precision import Precision

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, precision: Union[str, Precision] = "fp32",
             collectives: Optional[Collectives] = None,
             loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """The model's mean loss on ``loader`` and, for class targets, its accuracy.

    The loss is ``loss_fn(outputs, targets)`` (per-sample terms) when given (e.g. an objective's squared error for
    regression), else cross-entropy for integer class targets and the squared error
    (:func:`~metareweight.losses.mse_terms`) for float targets; ``accuracy`` is reported only for integer targets
    and ``(batch, classes)`` outputs. Batches and outputs follow the training conventions (dict inputs, Hugging
    Face ``ModelOutput``; see :mod:`metareweight.models`). Samples without targets count in neither. With
    ``collectives`` enabled and a loader on a ``DistributedSampler``, the ranks' sums are combined.
    """
    device = next(model.parameters()).device
    precision = precision if isinstance(precision, Precision) else Precision(precision, device)
    collectives = collectives if collectives is not None else Collectives()
    was_training = model.training
    model.eval()
    forward = precision.wrap(model_forward(model))
    # samples seen, labelled samples, their loss sum, samples with class targets, correct ones
    seen, labelled, loss_sum, classified, correct = 0, 0, 0.0, 0, 0
    try:
        for raw in loader:
            batch = as_batch(raw).to(device)
            out = forward(batch.inputs)
            seen += batch.size
            if batch.targets is None:
                continue
            y = batch.targets
            classes = (torch.is_tensor(out) and out.dim() == 2 and out.shape[1] >= 2 and y.dim() == 1
                       and not y.dtype.is_floating_point)
            if classes:
                y = y.long()  # int32 labels (numpy, HF datasets): cross-entropy needs int64
            terms = (loss_fn or (cross_entropy_terms if classes else mse_terms))(out, y)
            loss_sum += float(terms.double().sum())
            labelled += batch.size
            if classes:
                classified += batch.size
                correct += int((out.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    if collectives.enabled and isinstance(getattr(loader, "sampler", None), DistributedSampler):
        sums = torch.tensor([seen, labelled, loss_sum, classified, correct], dtype=torch.float64, device=device)
        collectives.all_reduce_mean_([sums])  # a sharded eval set: combine the ranks' sums
        seen, labelled, loss_sum, classified, correct = (float(v) * collectives.world_size for v in sums)
    if seen == 0:
        raise ValueError("the evaluation loader yielded no samples")
    if labelled == 0:
        raise ValueError("the evaluation batches carry no targets; evaluate needs labelled data")
    out = {"loss": loss_sum / labelled}
    if classified:
        out["accuracy"] = correct / classified
    return out
