"""The ``MetaObjective`` protocol: what φ is, how per-sample terms and weights are made, and the outer signal.

An objective is an ``nn.Module`` whose trainable parameters are the meta-parameters φ. It implements two functions
of a *bound forward* (the model run with whatever parameters the hypergradient method is evaluating):

- :meth:`MetaObjective.inner_terms` → :class:`~metareweight.core.WeightedTerms` on a train batch;
- :meth:`MetaObjective.outer_loss` → scalar on a meta batch (it may use φ directly, as the self-taught rescaler does).

Where the meta batches come from is ``meta_data``: ``"loader"`` (a separate meta loader, the default) or
``"train"`` (sampled with replacement from the training set itself). Reward-based objectives (policies trained by
REINFORCE) override :meth:`MetaObjective.meta_step` instead of relying on a hypergradient.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..core.problem import Forward, WeightedTerms
from ..data.batch import Batch

META_DATA_SOURCES = ("loader", "train")


class MetaObjective(nn.Module):
    """Base class for meta-objectives. Subclasses set ``meta_lr`` and implement the two loss functions."""

    meta_data: str = "loader"
    meta_lr: float = 1e-3
    meta_weight_decay: float = 0.0

    def inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:  # pragma: no cover - abstract
        raise NotImplementedError

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def meta_parameters(self) -> List[Tensor]:
        """φ: the objective's trainable parameters (frozen sub-modules such as a teacher are excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def make_meta_optimizer(self) -> torch.optim.Optimizer:
        """The default meta optimizer: Adam on φ with ``meta_lr`` and ``meta_weight_decay``."""
        params = self.meta_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__} has no meta-parameters to optimise")
        return torch.optim.Adam(params, lr=self.meta_lr, weight_decay=self.meta_weight_decay)

    # ---- optional hooks -------------------------------------------------------------------------------------
    uses_hypergradient: bool = True

    def meta_step(self, trainer: Any, batches: List[Batch], meta_batch: Batch) -> Dict[str, float]:
        """Reward-based objectives override this to update φ themselves (``uses_hypergradient = False``)."""
        raise NotImplementedError(f"{type(self).__name__} relies on a hypergradient method, not meta_step")

    def on_epoch_end(self, trainer: Any, epoch: int) -> Optional[Dict[str, float]]:
        """Called after each epoch; may return extra metrics to log."""
        return None
