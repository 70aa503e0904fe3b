"""Meta-Weight-Net (Shu et al., NeurIPS 2019): a small MLP maps each sample's loss to its weight.

Inner loss ``Σ_i ŵ_i ℓ_i`` with ``w_i = σ(MLP(ℓ_i))`` (1 → hidden → 1), normalised over the batch
(``ŵ_i = w_i / Σ_j w_j``, as in the authors' later code) or averaged (``ŵ_i = w_i / B``, the paper's first form).
The outer signal is the mean cross-entropy on a clean meta batch. The loss fed to the net is not detached: the inner step
treats weights as constants in θ, and multi-step unrolls differentiate the path φ → θ_t → ℓ_t → w_t exactly.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from ..core.problem import Forward, WeightedTerms
from ..data.batch import Batch
from ..distributed import global_mean
from ..losses import cross_entropy_terms
from .base import MetaObjective

LossFn = Callable[[Tensor, Tensor], Tensor]

META_LR_BUDGET = 0.1


def suggest_meta_lr(meta_steps: int, budget: float = META_LR_BUDGET) -> float:
    """The weight net's Adam learning rate for a run of ``meta_steps`` meta steps: ``budget / meta_steps``.

    Adam moves each weight-net parameter by about ``meta_lr`` per step whatever the hypergradient's scale, so what
    decides whether the weights separate is the total distance ``meta_lr × meta_steps``, not ``meta_lr`` alone.
    ``meta_steps`` is ``epochs × batches per epoch / meta_interval``.

    Example:
        >>> suggest_meta_lr(meta_steps=30 * 20)   # 30 epochs of 20 batches
        0.0001666...
    """
    if meta_steps < 1:
        raise ValueError(f"meta_steps must be >= 1, got {meta_steps}")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    return budget / meta_steps


class MetaWeightNet(MetaObjective):
    """Loss → weight MLP with a clean meta set.

    Args:
        hidden: width of the hidden layer (100 in the paper).
        normalize: normalise weights to sum to one over the batch (True) or divide by the batch size (False).
        meta_lr: Adam learning rate of the weight net (1e-3 in the paper, with weight decay 1e-4).
        meta_weight_decay: weight decay of the weight net.
        loss_fn: per-sample loss ``(outputs, targets) -> (batch,)``; cross-entropy by default.

    Example:
        >>> import torch
        >>> from metareweight.data import Batch
        >>> obj = MetaWeightNet(hidden=8)
        >>> model = torch.nn.Linear(3, 2)
        >>> wt = obj.inner_terms(model, Batch(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> wt.terms.shape, round(float(wt.weights.detach().sum()), 5)
        (torch.Size([4, 1]), 1.0)
    """

    def __init__(self, hidden: int = 100, normalize: bool = True, meta_lr: float = 1e-3,
                 meta_weight_decay: float = 1e-4, loss_fn: Optional[LossFn] = None):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())
        self.normalize = normalize
        self.meta_lr = meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.loss_fn = loss_fn or cross_entropy_terms

    def weight(self, losses: Tensor) -> Tensor:
        """Raw weights in (0, 1) for per-sample losses of shape ``(batch,)``."""
        net_dtype = self.net[0].weight.dtype
        return self.net(losses.to(net_dtype).unsqueeze(1)).squeeze(1)

    def inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:
        losses = self.loss_fn(forward(batch.inputs), batch.targets)
        w = self.weight(losses)
        # the normaliser is the global batch's (mean over ranks of the local sums) in a distributed run
        coef = w / global_mean(w.sum()).clamp_min(1e-12) if self.normalize else w / w.shape[0]
        return WeightedTerms(losses, coef.to(losses.dtype), report=w)

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:
        return self.loss_fn(forward(batch.inputs), batch.targets).mean()
