"""Learning to Reweight (L2RW; Ren et al., ICML 2018): per-example weights from one look-ahead step, no weight net.

For every train batch of a meta step, each example gets a meta variable ``ε_i = 0``; the virtual step is taken on
``Σ_i ε_i ℓ_i(θ)`` and the meta loss ``L_meta(θ'(ε))`` on a clean meta batch is differentiated with respect to ε.
The real step then weighs the batch with the normalised positive part of the negative hypergradient::

    w̃_i = max(−∂L_meta/∂ε_i, 0),     w_i = w̃_i / Σ_j w̃_j     (all w_i = 0 when every w̃_i = 0)

At ``ε = 0`` with SGD, ``−∂L_meta/∂ε_i = η ∇L_meta(θ)·∇ℓ_i(θ)``: an example is kept, in proportion, when its
gradient agrees with the meta gradient. The ε are *per-batch meta variables* of the protocol
(:meth:`~metareweight.objectives.MetaObjective.init_batch_variables`): created afresh for each batch, differentiated
by any hypergradient method like φ, and turned into the real step's weights by
:meth:`LearningToReweight.update_batch_variables`. There is no φ and no meta optimizer. Steps that are not meta
steps (``meta_interval > 1``) take the plain mean loss. In a data-parallel run the normaliser is the global batch's.

Example:
    >>> import torch
    >>> from metareweight import Batch, MetaStep
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 3)
    >>> meta = MetaStep(model, torch.optim.SGD(model.parameters(), lr=0.5), LearningToReweight())
    >>> x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    >>> out = meta.step(Batch(x[:16], y[:16], torch.arange(16)), Batch(x[16:], y[16:]))
    >>> _, w = out.sample_weights()
    >>> bool((w >= 0).all()), round(float(w.sum()), 4)
    (True, 1.0)
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..core.problem import Forward, WeightedTerms
from ..data.batch import Batch
from ..losses import cross_entropy_terms
from .base import MetaObjective

LossFn = Callable[[Tensor, Tensor], Tensor]


class LearningToReweight(MetaObjective):
    """L2RW: per-example ε = 0 for each batch, weights from the sign-clipped negative hypergradient.

    Args:
        loss_fn: per-sample loss ``(outputs, targets) -> (batch,)`` for the train and the meta batches;
            cross-entropy by default.
        dtype: dtype of ε (default: the batch inputs' floating dtype, else torch's default); match the model's
            parameters for exact float64 checks.
    """

    def __init__(self, loss_fn: Optional[LossFn] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.loss_fn = loss_fn or cross_entropy_terms
        self.dtype = dtype

    def make_meta_optimizer(self) -> torch.optim.Optimizer:
        raise ValueError("LearningToReweight has no meta-parameters: its per-example weights are recomputed from "
                         "ε = 0 for every batch, so it needs no meta optimizer")

    def init_batch_variables(self, batch: Batch) -> List[Tensor]:
        """``[ε]``: zeros ``(batch,)`` requiring grad, on the batch's device."""
        ref = next((t for t in (batch.inputs, batch.targets, batch.index) if torch.is_tensor(t)), None)
        device = ref.device if ref is not None else None
        dtype = self.dtype or (batch.inputs.dtype if torch.is_tensor(batch.inputs)
                               and batch.inputs.dtype.is_floating_point else torch.get_default_dtype())
        return [torch.zeros(batch.size, dtype=dtype, device=device, requires_grad=True)]

    def update_batch_variables(self, batch: Batch, variables: Sequence[Tensor],
                               grads: Sequence[Tensor]) -> List[Tensor]:
        """The real step's weights: ``max(−∂L_meta/∂ε, 0)``, normalised to sum to one over the (global) batch."""
        positive = torch.clamp(-grads[0].detach(), min=0)
        total = positive.new_tensor(float(positive.sum()))
        self.collectives.all_reduce_mean_([total])  # the mean of the ranks' sums: local weights average to Σ = 1
        if float(total) <= 0:
            return [torch.zeros_like(positive)]
        return [positive / total]

    def inner_terms(self, forward: Forward, batch: Batch, *variables: Tensor) -> WeightedTerms:
        """``ℓ_i`` with weight ``ε_i`` in the virtual step, ``w_i`` in the real step, ``1/B`` in a plain step."""
        losses = self.loss_fn(forward(batch.inputs), batch.targets)
        if variables:
            weights = variables[0]
        else:
            weights = torch.full_like(losses.detach(), 1.0 / losses.shape[0])
        return WeightedTerms(losses, weights.to(losses.dtype), report=weights)

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:
        """The mean loss on the clean meta batch."""
        return self.loss_fn(forward(batch.inputs), batch.targets).mean()


__all__ = ["LearningToReweight"]
