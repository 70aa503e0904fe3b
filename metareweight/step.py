"""``MetaStep``: one meta step and the real step around your model, optimizer and objective (no loop, no loaders).

:meth:`MetaStep.step` takes a group of train batches (one per unrolled inner step) and a meta batch and runs, in
this order (``metareweight/objectives/base.py`` documents the objective's side of it):

1. the objective's fresh per-batch meta variables, if it has any (L2RW's ε);
2. the :class:`~metareweight.core.BilevelProblem` at the current θ, optimizer state and φ, and the hypergradient
   method on it (the virtual steps);
3. the meta step: φ's gradient averaged across ranks, accumulated, clipped and stepped; per-batch variables updated
   by the objective;
4. the real step: ``real_step="recompute"`` re-weights each batch with the updated φ and steps your optimizer
   (from the method's :meth:`~metareweight.core.HypergradMethod.replay` when it can), or ``"lookahead"`` commits
   the method's virtual parameters and optimizer state.

:meth:`MetaStep.plain_step` is the weighted real step alone (steps between meta steps). Objectives without a
hypergradient run their own :meth:`~metareweight.objectives.MetaObjective.meta_step` on a
:class:`~metareweight.objectives.MetaContext`. ``MetaStep`` is the one place that counts steps: ``global_step``
(train batches consumed) and ``meta_steps``. :class:`~metareweight.MetaTrainer` is a loop around it; your own loop
(Accelerate, an HF ``Trainer.training_step``) can call it directly.

Where things go: this module only orders the work. What φ is and how weights are made is an objective
(``metareweight/objectives/``, contract in ``objectives/base.py``); how ``dL_out/dφ`` is computed is a method
(``metareweight/core/hypergrad/``, contract in ``hypergrad/base.py``), with per-layer rules in
``metareweight/core/layers/``; the optimizer's update rule for virtual steps is ``core/optim.py``; precision and
data-parallel reductions are :mod:`metareweight.precision` and :class:`~metareweight.core.strategy.Collectives`.
Loops, epochs, checkpoints and logging belong to the trainer (``trainer.py``, ``checkpoint.py``, ``recorder.py``).

Example:
    >>> import torch
    >>> from metareweight import Batch, MetaStep, MetaWeightNet
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(5, 3)
    >>> meta = MetaStep(model, torch.optim.SGD(model.parameters(), lr=0.1), MetaWeightNet(hidden=8))
    >>> x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    >>> out = meta.step([Batch(x[:16], y[:16], torch.arange(16))], Batch(x[16:], y[16:]))
    >>> sorted(out.metrics), meta.global_step, meta.meta_steps
    (['meta_loss', 'train_loss'], 1, 1)
    >>> index, weight = out.sample_weights(); index.shape, weight.shape
    (torch.Size([16]), torch.Size([16]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .core.hypergrad import Fast, HypergradMethod, get_hypergradient
from .core.optim import FunctionalOptimizer
from .core.problem import BilevelProblem, Forward, HypergradResult, WeightedTerms
from .core.strategy import Collectives
from .data.batch import Batch, as_batch
from .losses import ensure_finite
from .models import model_forward
from .objectives.base import MetaContext, MetaObjective
from .precision import Precision
from .validation import REAL_STEPS, validate_step_args

Record = Callable[[Batch, Tensor], None]

__all__ = ["MetaStep", "StepResult", "REAL_STEPS"]


@dataclass
class StepResult:
    """What one :meth:`MetaStep.step` or :meth:`MetaStep.plain_step` did.

    Attributes:
        metrics: ``train_loss`` (mean loss term of the batches), ``meta_loss`` (meta steps) and the method's or
            objective's statistics, as floats.
        weights: ``(batch, per-sample weights)`` of every batch the step consumed, in order.
    """

    metrics: Dict[str, float]
    weights: List[Tuple[Batch, Tensor]] = field(default_factory=list)

    def sample_weights(self) -> Tuple[Tensor, Tensor]:
        """``(index, weight)`` over all batches of the step (index ``-1`` where a batch has none)."""
        if not self.weights:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        index = [b.index.reshape(-1).long().cpu() if b.index is not None else torch.full((len(w),), -1)
                 for b, w in self.weights]
        return torch.cat(index), torch.cat([w.reshape(-1).float().cpu() for _, w in self.weights])


class MetaStep:
    """One meta step plus the real step (see the module docs).

    Args:
        model: the ``nn.Module`` to train (virtual steps never modify it).
        optimizer: its ``torch.optim`` optimizer (SGD, Adam or AdamW); virtual steps mirror its current
            hyper-parameters and state at every meta step.
        objective: a :class:`~metareweight.objectives.MetaObjective` (its parameters are φ).
        method: a hypergradient method name (``"unrolled"``, ``"fast"``, ...) or instance.
        meta_optimizer: optimizer over ``objective.meta_parameters()``; default from the objective.
        hypergrad_options: options for a named method.
        unroll_steps: the most train batches one :meth:`step` takes (one virtual step each).
        real_step: ``"recompute"`` or ``"lookahead"`` (see the module docs).
        adam_preconditioner: ``"differentiable"`` or ``"fixed"`` (treat Adam's denominator as constant).
        grad_clip, meta_grad_clip: max gradient norm of the real step / of the hypergradient (None: no clipping).
        accumulate_steps, meta_accumulate_steps: step the optimizer / meta optimizer once every that many real /
            meta steps on the mean of their gradients (:meth:`flush` applies a partial window).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or a :class:`~metareweight.precision.Precision`.
        collectives: the data-parallel strategy (:class:`~metareweight.distributed.DistributedContext`); default
            one process. The objective's ``collectives`` is set to it.
        scheduler, meta_scheduler: learning-rate schedulers stepped after every step of their optimizer.
        record: called as ``record(batch, weights)`` for every batch consumed, before its step is counted
            (the trainer passes :meth:`WeightRecorder.record <metareweight.recorder.WeightRecorder.record>`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: MetaObjective,
                 method: Union[str, HypergradMethod] = "unrolled", meta_optimizer: Optional[torch.optim.Optimizer] = None,
                 *, hypergrad_options: Optional[Mapping[str, Any]] = None, unroll_steps: int = 1,
                 real_step: str = "recompute", adam_preconditioner: str = "differentiable",
                 grad_clip: Optional[float] = None, meta_grad_clip: Optional[float] = None, accumulate_steps: int = 1,
                 meta_accumulate_steps: int = 1, precision: Union[str, Precision] = "fp32",
                 collectives: Optional[Collectives] = None, scheduler: Any = None, meta_scheduler: Any = None,
                 record: Optional[Record] = None):
        checked = validate_step_args(model, objective, unroll_steps=unroll_steps, accumulate_steps=accumulate_steps,
                                     meta_accumulate_steps=meta_accumulate_steps, grad_clip=grad_clip,
                                     meta_grad_clip=meta_grad_clip, real_step=real_step,
                                     adam_preconditioner=adam_preconditioner, method=method, precision=precision)
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.device = next(model.parameters()).device
        objective.to(self.device)
        self.adam_preconditioner = adam_preconditioner
        FunctionalOptimizer.from_torch(optimizer, model, adam_preconditioner)  # refuse an unsupported one now
        self.method = get_hypergradient(method, hypergrad_options) if objective.uses_hypergradient else None
        if real_step == "lookahead" and isinstance(self.method, Fast) and not self.method.lookahead:
            if not isinstance(method, str):
                raise ValueError("real_step='lookahead' commits the virtual step, which Fast() materialises only with "
                                 "Fast(lookahead=True): pass Fast(lookahead=True) (or the name 'fast')")
            self.method.lookahead = True  # "fast" by name: materialise θ' for the real step
        self.meta_optimizer = meta_optimizer or (objective.make_meta_optimizer()
                                                 if objective.meta_parameters() else None)
        self.unroll_steps, self.real_step = checked["unroll_steps"], real_step
        self.grad_clip, self.meta_grad_clip = checked["grad_clip"], checked["meta_grad_clip"]
        self.accumulate_steps, self.meta_accumulate_steps = checked["accumulate_steps"], checked["meta_accumulate_steps"]
        self.precision = precision if isinstance(precision, Precision) else Precision(precision, self.device)
        self.collectives = collectives if collectives is not None else Collectives()
        objective.collectives = self.collectives
        self.scheduler, self.meta_scheduler = scheduler, meta_scheduler
        self.record = record
        self.global_step = 0  # train batches consumed
        self.meta_steps = 0
        self.accumulated = 0  # real steps whose gradients wait for the optimizer
        self.meta_accumulated = 0
        self._variables: Dict[int, List[Tensor]] = {}  # per-batch meta variables of the step in progress
        self._result: Optional[StepResult] = None

    # ---- what objectives and methods see --------------------------------------------------------------------
    @property
    def functional_optimizer(self) -> FunctionalOptimizer:
        """The optimizer's update rule with its current hyper-parameters (mirrored afresh on every access)."""
        return FunctionalOptimizer.from_torch(self.optimizer, self.model, self.adam_preconditioner)

    @property
    def context(self) -> MetaContext:
        """The :class:`~metareweight.objectives.MetaContext` handed to the objective's own hooks."""
        return MetaContext(self.model, self.optimizer, self.functional_optimizer, self.meta_optimizer,
                           self.collectives, self._real_step, self._record)

    def build_problem(self, batches: Sequence[Batch], meta_batch: Batch) -> BilevelProblem:
        """The bilevel problem of a meta step at the current parameters; its ``meta_params`` are φ followed by the
        per-batch variables of the step in progress."""
        fopt = self.functional_optimizer
        optimizer = fopt
        if self.collectives.enabled:  # the virtual step is the global one: the ranks' mean direction
            from .distributed import SyncedFunctionalOptimizer
            optimizer = SyncedFunctionalOptimizer(fopt, self.collectives)
        variables = [v for b in batches for v in self._variables.get(id(b), ())]
        return BilevelProblem(
            model=self.model,
            params={k: v.detach() for k, v in self.model.named_parameters()},
            buffers={k: v.detach() for k, v in self.model.named_buffers()},
            optimizer=optimizer,
            opt_state=fopt.read_state(),
            meta_params=self.objective.meta_parameters() + variables,
            inner=self.precision.wrap_fn(self._inner_terms),
            outer=self.precision.scale_outer(self.precision.wrap_fn(self.objective.outer_loss)),
            train_batches=list(batches),
            meta_batch=meta_batch,
            collectives=self.collectives,
        )

    def _inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:
        """The objective's terms of ``batch``, with its per-batch variables when the step in progress has some."""
        variables = self._variables.get(id(batch))
        if variables:
            return self.objective.inner_terms(forward, batch, *variables)
        return self.objective.inner_terms(forward, batch)

    # ---- the two entry points -------------------------------------------------------------------------------
    def step(self, batches: Any, meta_batch: Any) -> StepResult:
        """One meta step on ``batches`` (one batch, or a list of up to ``unroll_steps``; anything
        :func:`~metareweight.data.as_batch` reads) and ``meta_batch``, then the real step of each batch (or the
        committed lookahead). Returns the metrics and the weights used."""
        batches = self._prepare(batches)
        meta_batch = as_batch(meta_batch).to(self.device)
        self._train_mode()
        self._result = result = StepResult({})
        try:
            if self.method is None:
                result.metrics = self._objective_meta_step(batches, meta_batch)
            else:
                result.metrics = self._hypergradient_meta_step(batches, meta_batch)
        finally:
            self._variables, self._result = {}, None
        return result

    def _hypergradient_meta_step(self, batches: List[Batch], meta_batch: Batch) -> Dict[str, float]:
        # 1. the objective's per-batch meta variables (usually none)
        self._variables = {id(b): list(self.objective.init_batch_variables(b)) for b in batches}
        if self.real_step == "lookahead" and any(self._variables.values()):
            raise ValueError(f"{type(self.objective).__name__} has per-batch meta variables, which are updated after "
                             "the virtual step, so committing that step would ignore them; use "
                             "real_step='recompute'")
        # 2. the virtual steps and the hypergradient d L_out / d(φ, variables)
        hyper = self.method(self.build_problem(batches, meta_batch))
        meta_loss = hyper.outer_loss / self.precision.meta_scale()
        # 3. the meta step: φ by the meta optimizer, the variables by the objective
        n_phi = len(self.objective.meta_parameters())
        if n_phi:
            self._apply_hypergradient(hyper.grads[:n_phi])
        self._update_variables(batches, hyper.grads[n_phi:])
        self.meta_steps += 1
        # 4. the real step with the updated φ and variables, or the committed lookahead
        if self.real_step == "lookahead":
            train_loss = self.commit(hyper, batches)
        else:
            train_loss = float(np.mean([self._real_step(b) for b in batches]))
        return {"train_loss": train_loss, "meta_loss": meta_loss, **hyper.stats}

    def _objective_meta_step(self, batches: List[Batch], meta_batch: Batch) -> Dict[str, float]:
        """An objective without a hypergradient updates φ (and the model) itself, through the context."""
        start = self.global_step
        metrics = dict(self.objective.meta_step(self.context, batches, meta_batch))
        self.meta_steps += 1
        self.global_step = start + len(batches)  # every batch of the group is one step, however it was used
        return metrics

    def plain_step(self, batches: Any) -> StepResult:
        """The weighted real step of each batch with the current φ (no meta step, no per-batch variables)."""
        batches = self._prepare(batches)
        self._result = result = StepResult({})
        try:
            result.metrics = {"train_loss": float(np.mean([self._real_step(b) for b in batches]))}
        finally:
            self._result = None
        return result

    def flush(self) -> None:
        """Apply partially filled accumulation windows (the trainer calls it at the end of every epoch)."""
        if self.accumulated:
            self._optimizer_step()
        if self.meta_accumulated:
            self._meta_optimizer_step()

    def _prepare(self, batches: Any) -> List[Batch]:
        """One batch (a :class:`Batch`, a mapping, or a tuple holding tensors) or a sequence of them, on device."""
        single = isinstance(batches, (Batch, Mapping)) or (isinstance(batches, (tuple, list))
                                                           and any(torch.is_tensor(b) for b in batches))
        batches = [batches] if single else list(batches)
        if not 1 <= len(batches) <= self.unroll_steps:
            raise ValueError(f"a step takes 1 to unroll_steps={self.unroll_steps} train batches, got {len(batches)}")
        return [as_batch(b).to(self.device) for b in batches]

    # ---- inside a step --------------------------------------------------------------------------------------
    def _train_mode(self) -> None:
        """``model.train()``, skipped when every module already trains (setting the flags costs more than checking)."""
        if not all(m.training for m in self.model.modules()):
            self.model.train()

    def _record(self, batch: Batch, weights: Tensor) -> None:
        weights = weights.detach()
        if self._result is not None:
            self._result.weights.append((batch, weights))
        if self.record is not None:
            self.record(batch, weights)

    def _update_variables(self, batches: Sequence[Batch], grads: Sequence[Tensor]) -> None:
        start = 0
        for b in batches:
            variables = self._variables[id(b)]
            if variables:
                got = [g.detach() for g in grads[start:start + len(variables)]]
                self._variables[id(b)] = list(self.objective.update_batch_variables(b, variables, got))
                start += len(variables)

    def _real_step(self, batch: Batch) -> float:
        self._train_mode()
        if self.accumulated == 0:
            self.optimizer.zero_grad(set_to_none=True)
        wt = self._replayed(batch)
        if wt is None:
            wt = self._inner_terms(self.precision.wrap(model_forward(self.model)), batch)
            loss = (wt.weights.detach() * wt.terms).sum()
            ensure_finite(loss.detach(), f"the training loss at step {self.global_step}")
            self.precision.backward(loss / self.accumulate_steps)
        self.accumulated += 1
        if self.accumulated == self.accumulate_steps:
            self._optimizer_step()
        self._record(batch, wt.sample_weights())
        self.global_step += 1
        return float(wt.terms.detach().double().mean())

    def _replayed(self, batch: Batch) -> Optional[WeightedTerms]:
        """Add the real step's gradient from the method's :meth:`~HypergradMethod.replay` when it has one (fp32
        only). Returns the batch's terms, or None."""
        out = self.method.replay(batch) if self.method is not None and self.precision.mode == "fp32" else None
        if out is None:
            return None
        wt, grads = out
        ensure_finite((wt.weights * wt.terms).sum(), f"the training loss at step {self.global_step}")
        for name, p in self.model.named_parameters():
            if grads.get(name) is not None:
                g = grads[name] if self.accumulate_steps == 1 else grads[name] / self.accumulate_steps
                p.grad = g if p.grad is None else p.grad + g
        return wt

    def commit(self, result: HypergradResult, batches: Sequence[Batch]) -> float:
        """``real_step="lookahead"``: copy ``result``'s virtual parameters and optimizer state into the model and
        record the batches' weights (one step each). Returns the batches' mean loss term."""
        if result.lookahead is None:
            hint = ("build it as Fast(lookahead=True)" if isinstance(self.method, Fast)
                    else "use real_step='recompute'")
            raise ValueError(f"hypergradient {self.method.name!r} does not return lookahead parameters (the virtual "
                             f"parameters that real_step='lookahead' commits); {hint}")
        losses = []  # weights for the record and buffer updates (BatchNorm running stats) from a no-grad pass
        with torch.no_grad():
            self._train_mode()
            for batch in batches:
                wt = self._inner_terms(self.precision.wrap(model_forward(self.model)), batch)
                self._record(batch, wt.sample_weights())
                losses.append(float(wt.terms.double().mean()))
                self.global_step += 1
            params, state = result.lookahead
            for name, p in self.model.named_parameters():
                if name in params:
                    p.copy_(params[name])
        self.functional_optimizer.write_state(state, self.model)
        return float(np.mean(losses))

    def _optimizer_step(self) -> None:
        """Average gradients across ranks, then unscale (fp16), clip, step and schedule."""
        params = [p for p in self.model.parameters() if p.requires_grad] \
            if self.collectives.enabled or self.grad_clip is not None else []  # only averaging and clipping need them
        self.collectives.all_reduce_mean_([p.grad for p in params])
        Precision.step(self.optimizer, params, self.precision.scaler, self.grad_clip)
        self.accumulated = 0
        if self.scheduler is not None:
            self.scheduler.step()

    def _apply_hypergradient(self, grads: Sequence[Tensor]) -> None:
        """Average the hypergradient across ranks, accumulate it in ``.grad`` and step φ when a window is full."""
        params = self.objective.meta_parameters()
        if self.precision.meta_scaler is None:  # with fp16 the scaler skips steps with inf/NaN instead
            for g in grads:
                ensure_finite(g, "the hypergradient")
        grads = [g.detach().to(p.dtype) / self.meta_accumulate_steps for p, g in zip(params, grads)]
        self.collectives.all_reduce_mean_(grads)
        for p, g in zip(params, grads):
            p.grad = g if self.meta_accumulated == 0 or p.grad is None else p.grad + g
        self.meta_accumulated += 1
        if self.meta_accumulated == self.meta_accumulate_steps:
            self._meta_optimizer_step()

    def _meta_optimizer_step(self) -> None:
        """Unscale (fp16), clip and step φ, then the meta scheduler."""
        Precision.step(self.meta_optimizer, self.objective.meta_parameters(), self.precision.meta_scaler,
                       self.meta_grad_clip)
        self.meta_accumulated = 0
        if self.meta_scheduler is not None:
            self.meta_scheduler.step()
