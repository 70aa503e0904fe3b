"""The ``MetaObjective`` protocol: what φ is, how per-sample terms and weights are made, and the outer signal.

An objective is an ``nn.Module`` whose trainable parameters are the meta-parameters φ. It implements two functions
of a *bound forward* (the model run with whatever parameters the hypergradient method is evaluating):

- :meth:`MetaObjective.inner_terms` → :class:`~metareweight.core.WeightedTerms` on a train batch;
- :meth:`MetaObjective.outer_loss` → scalar on a meta batch (it may use φ directly, as the self-taught rescaler does).

Where the meta batches come from is ``meta_data``: ``"loader"`` (a separate meta loader, the default) or
``"train"`` (sampled with replacement from the training set itself).

**The call order** of one meta step (:meth:`metareweight.MetaStep.step`, on a group of ``k = unroll_steps`` train
batches ``B_1..B_k`` and a meta batch):

1. *per-batch variables*: ``v_t = init_batch_variables(B_t)`` for every batch (usually none; L2RW's ε = 0);
2. *virtual steps* (inside the hypergradient method): ``inner_terms(forward_θt, B_t, *v_t)`` for each step, then
   ``outer_loss(forward_θk, meta_batch)``; the method returns ``dL_out/d(φ, v)``;
3. *meta step*: the meta optimizer steps φ on its part of that gradient (accumulation and clipping apply), and
   ``v_t ← update_batch_variables(B_t, v_t, dL_out/dv_t)``;
4. *real step*, per batch: ``inner_terms(model, B_t, *v_t)`` with the updated φ and variables, one step of the
   user's optimizer (``real_step="recompute"``); or the method's :meth:`~metareweight.core.HypergradMethod.replay`
   of the same gradient from its captures; or, with ``real_step="lookahead"``, the method's virtual parameters are
   committed (a no-grad ``inner_terms`` pass then gives the weights to record and the BatchNorm statistics).

Steps that are not meta steps (``meta_interval > 1``) call ``inner_terms(model, B)`` without variables.
Objectives without a hypergradient (``uses_hypergradient = False``, e.g. a policy trained by REINFORCE) replace
2-4 by :meth:`MetaObjective.meta_step`, which receives a :class:`MetaContext`, never the trainer.
:meth:`MetaObjective.on_epoch_end` runs after every epoch of :class:`~metareweight.MetaTrainer`.

Batch-level reductions (a weight normaliser over the global batch) go through ``self.collectives``, which
:class:`~metareweight.MetaStep` sets to the data-parallel strategy of the run (one process by default).

**A new objective** goes in its own file in ``metareweight/objectives/`` (a subclass of :class:`MetaObjective`),
is exported from ``objectives/__init__.py`` and ``metareweight/__init__.py`` (the public API test requires it), and
gets ``tests/test_<objective>.py``; its reproduction script goes in ``experiments/`` and its numbers in
``experiments/RESULTS.md``. Objectives from outside the package load as plugins (:mod:`metareweight.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.optim import FunctionalOptimizer
from ..core.problem import Forward, WeightedTerms
from ..core.strategy import Collectives
from ..data.batch import Batch

META_DATA_SOURCES = ("loader", "train")


@dataclass
class MetaContext:
    """What an objective's own :meth:`MetaObjective.meta_step` and :meth:`MetaObjective.on_epoch_end` may use.

    Attributes:
        model: the user's model (θ); the objective may update it in place (Reptile does).
        optimizer: the user's torch optimizer of the model.
        functional_optimizer: its update rule as a :class:`~metareweight.core.FunctionalOptimizer` (current
            hyper-parameters), for virtual steps of the objective's own.
        meta_optimizer: the optimizer of φ (None when φ is empty).
        collectives: the data-parallel strategy (:class:`~metareweight.core.strategy.Collectives`).
        real_step: ``real_step(batch) -> mean loss``: one ordinary weighted step of the model with the current φ
            (clipping, accumulation and weight records included; counted as that batch's step).
        record: ``record(batch, weights)``: log per-sample weights ``(batch,)`` for a batch the objective consumed
            itself (without :attr:`real_step`).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    functional_optimizer: FunctionalOptimizer
    meta_optimizer: Optional[torch.optim.Optimizer]
    collectives: Collectives
    real_step: Callable[[Batch], float]
    record: Callable[[Batch, Tensor], None]


class MetaObjective(nn.Module):
    """Base class for meta-objectives. Subclasses set ``meta_lr`` and implement the two loss functions."""

    meta_data: str = "loader"
    meta_lr: float = 1e-3
    meta_weight_decay: float = 0.0
    uses_hypergradient: bool = True
    learns_weights: bool = True  # False for a fixed-weight baseline (no "weights do not spread" health warning)
    collectives: Collectives = Collectives()  # replaced by MetaStep with the run's strategy

    def inner_terms(self, forward: Forward, batch: Batch, *variables: Tensor) -> WeightedTerms:  # pragma: no cover
        """The per-sample loss terms of ``batch`` under ``forward`` and their weights (which depend on φ and, in a
        meta step, on this batch's ``variables`` from :meth:`init_batch_variables`; a plain step passes none).
        The inner loss is ``Σ w_ik ℓ_ik``: put any ``1/B`` normalisation in the weights."""
        raise NotImplementedError

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:  # pragma: no cover - abstract
        """The scalar outer (meta) loss ``L_out`` of ``forward`` (the looked-ahead model) on a meta batch; it may
        also depend on φ directly."""
        raise NotImplementedError

    def init_batch_variables(self, batch: Batch) -> List[Tensor]:
        """Fresh per-batch meta variables for a train batch of a meta step, each a leaf tensor with
        ``requires_grad=True`` (L2RW's per-example ε = 0). The hypergradient is taken with respect to them too, and
        :meth:`update_batch_variables` turns it into the values the real step uses. Default: none."""
        return []

    def update_batch_variables(self, batch: Batch, variables: Sequence[Tensor],
                               grads: Sequence[Tensor]) -> List[Tensor]:
        """The variables the real step of ``batch`` uses, given ``dL_out/dvariables`` (detached tensors; only
        called for objectives that create variables)."""
        raise NotImplementedError(f"{type(self).__name__} creates per-batch variables but does not say how to "
                                  "update them: implement update_batch_variables")

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
    def meta_step(self, context: MetaContext, batches: List[Batch], meta_batch: Batch) -> Dict[str, float]:
        """Reward-based objectives (``uses_hypergradient = False``) override this to update φ and the model
        themselves for a group of train batches; returns metrics. Every batch of the group counts as one step."""
        raise NotImplementedError(f"{type(self).__name__} relies on a hypergradient method, not meta_step")

    def on_epoch_end(self, context: MetaContext, epoch: int) -> Optional[Dict[str, float]]:
        """Called after each epoch of :class:`~metareweight.MetaTrainer`; may return extra metrics to log."""
        return None
