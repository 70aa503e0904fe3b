"""The bilevel problem of one meta step, in functional form, shared by every hypergradient method.

    L_in(θ, φ)  = Σ_i Σ_k  w_ik(φ) · ℓ_ik(θ)        on train batches B_1..B_k (one optimizer step each)
    L_out(θ', φ)                                    on a meta batch, θ' = the parameters after those steps

An objective says how ``ℓ`` and ``w`` are computed (:class:`WeightedTerms`) and what ``L_out`` is; a method
(``metareweight.core.hypergrad``) turns a :class:`BilevelProblem` into ``dL_out/dφ``. The per-sample terms and
their weights stay separate all the way to the method, so methods that exploit that structure (the fast exact
one-step method) can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data.batch import Batch
from ..losses import ensure_finite
from ..models import eager_experts, explained_model_errors, fused_experts, logits_of, math_attention, model_kwargs
from .optim import FunctionalOptimizer, State
from .strategy import Collectives

Params = Dict[str, Tensor]
Forward = Callable[..., object]


@dataclass
class WeightedTerms:
    """Per-sample loss terms and the coefficients that weigh them.

    Attributes:
        terms: ``(batch, K)`` loss terms ``ℓ_ik``; they depend on the model parameters θ.
        weights: ``(batch, K)`` coefficients ``w_ik``; they depend on the meta-parameters φ and may also depend
            on θ through features of the model (losses, probabilities). The inner step treats them as constants
            in θ: its direction is ``Σ w_ik ∇ℓ_ik`` (a vector-Jacobian product with the weights as cotangents),
            while hypergradients still follow every path from φ, including φ → θ_t → features → w_t in
            multi-step unrolls. Do not detach features: exactness tests compare against the true objective.
            The inner loss is ``Σ w_ik ℓ_ik``, so any ``1/B`` normalisation belongs in the weights.
        report: ``(batch,)`` the per-sample weight to log and analyse (e.g. the weight net's raw output).
    """

    terms: Tensor
    weights: Tensor
    report: Optional[Tensor] = None

    def __post_init__(self):
        if self.terms.dim() == 1:
            self.terms = self.terms.unsqueeze(1)
        if self.weights.dim() == 1:
            self.weights = self.weights.unsqueeze(1)
        if self.terms.shape != self.weights.shape:
            raise ValueError(f"loss terms {tuple(self.terms.shape)} and weights {tuple(self.weights.shape)} must have "
                             "the same (batch, K) shape")

    def loss(self) -> Tensor:
        """``Σ w_ik ℓ_ik`` with the weights held constant (the loss whose gradient is the inner step)."""
        return (self.weights.detach() * self.terms).sum()

    def sample_weights(self) -> Tensor:
        return (self.report if self.report is not None else self.weights.sum(1)).detach()


InnerFn = Callable[[Forward, Batch], WeightedTerms]
OuterFn = Callable[[Forward, Batch], Tensor]


def bind(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> Forward:
    """A callable that runs ``model`` with ``params`` and ``buffers`` substituted (the model is not modified).

    It follows :mod:`metareweight.models`' conventions: ``forward(inputs)`` passes a dict of inputs as keyword
    arguments and a tuple positionally, returns logits (``output.logits`` of a Hugging Face ``ModelOutput``), and
    runs attention with the math kernel and a mixture of experts as the eager loop, which have the double-backward
    and forward-mode rules the fused ``scaled_dot_product_attention`` and ``grouped_mm`` kernels lack.
    """
    tensors = {**buffers, **params}
    experts = fused_experts(model)

    def forward(*args, **kwargs):
        if len(args) == 1 and not kwargs:
            if isinstance(args[0], Mapping):
                args, kwargs = (), model_kwargs(model, args[0])
            elif isinstance(args[0], (tuple, list)):
                args = tuple(args[0])
        with math_attention(), eager_experts(experts), \
                explained_model_errors(model, kwargs or (args[0] if len(args) == 1 else None)):
            out = functional_call(model, tensors, args, kwargs, strict=False)
        return logits_of(out)

    forward._metareweight_forward = True  # type: ignore[attr-defined]
    return forward


@dataclass
class HypergradResult:
    """What a hypergradient method returns.

    Attributes:
        grads: ``dL_out/dφ``, one tensor per meta-parameter (zeros where φ had no influence).
        outer_loss: the value of ``L_out`` at the looked-ahead parameters.
        lookahead: the virtual parameters and optimizer state after the inner steps (detached), when the method
            computed them; ``MetaTrainer(real_step="lookahead")`` commits them as the real step.
        stats: method-specific diagnostics (numbers only).
    """

    grads: List[Tensor]
    outer_loss: float
    lookahead: Optional[Tuple[Params, State]] = None
    stats: Dict[str, float] = field(default_factory=dict)


@dataclass
class BilevelProblem:
    """One meta step: current θ, the inner optimizer, φ, the objective's functions and the data they see.

    ``meta_params`` are the tensors the hypergradient is taken with respect to: the objective's φ, followed by any
    per-batch meta variables of this step (:meth:`~metareweight.objectives.MetaObjective.init_batch_variables`).
    ``collectives`` says how reductions cross data-parallel ranks (:mod:`metareweight.core.strategy`; the default is
    one process); methods use it for every cross-rank reduction they need.
    """

    model: nn.Module
    params: Params
    buffers: Params
    optimizer: FunctionalOptimizer
    opt_state: State
    meta_params: List[Tensor]
    inner: InnerFn
    outer: OuterFn
    train_batches: Sequence[Batch]
    meta_batch: Batch
    collectives: Collectives = field(default_factory=Collectives)

    @classmethod
    def from_model(cls, model: nn.Module, optimizer: torch.optim.Optimizer, objective, train_batches: Sequence[Batch],
                   meta_batch: Batch, preconditioner: str = "differentiable",
                   collectives: Optional[Collectives] = None) -> "BilevelProblem":
        """The problem of one meta step at ``model``'s current parameters, outside a ``MetaTrainer``: its torch
        ``optimizer`` (state included) mirrored, and ``objective``'s φ, inner terms and outer loss (an objective
        with per-batch meta variables needs :class:`~metareweight.MetaStep`, which creates them)."""
        fopt = FunctionalOptimizer.from_torch(optimizer, model, preconditioner)
        return cls(model=model, params={k: v.detach() for k, v in model.named_parameters()},
                   buffers={k: v.detach() for k, v in model.named_buffers()}, optimizer=fopt,
                   opt_state=fopt.read_state(), meta_params=objective.meta_parameters(), inner=objective.inner_terms,
                   outer=objective.outer_loss, train_batches=list(train_batches), meta_batch=meta_batch,
                   collectives=collectives if collectives is not None else Collectives())

    def forward(self, params: Mapping[str, Tensor]) -> Forward:
        """Bind ``params`` with a private copy of the buffers, so BatchNorm statistics of virtual passes are
        not written into the user's model."""
        return bind(self.model, params, {k: v.clone() for k, v in self.buffers.items()})

    def inner_terms(self, params: Mapping[str, Tensor], batch: Batch) -> WeightedTerms:
        wt = self.inner(self.forward(params), batch)
        ensure_finite(wt.terms.detach(), "the inner loss terms")
        return wt

    def outer_loss(self, params: Mapping[str, Tensor]) -> Tensor:
        return ensure_finite(self.outer(self.forward(params), self.meta_batch), "the outer (meta) loss")

    def trainable(self, params: Mapping[str, Tensor]) -> List[str]:
        return [n for n in self.optimizer.param_names if n in params]

    def step_grads(self, wt: WeightedTerms, params: Mapping[str, Tensor], *, create_graph: bool = False
                   ) -> Dict[str, Optional[Tensor]]:
        """The inner step direction ``Σ w_ik ∇_θ ℓ_ik`` (differentiable in the weights when ``create_graph``)."""
        names = self.trainable(params)
        weights = wt.weights if create_graph else wt.weights.detach()
        grads = torch.autograd.grad(wt.terms, [params[n] for n in names], grad_outputs=weights,
                                    create_graph=create_graph, allow_unused=True)
        return dict(zip(names, grads))

    def grad_dict(self, loss: Tensor, params: Mapping[str, Tensor], *, create_graph: bool = False,
                  retain_graph: Optional[bool] = None) -> Dict[str, Optional[Tensor]]:
        """``∇_θ loss`` as a name → tensor dict (``None`` for parameters the loss does not use)."""
        names = self.trainable(params)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph,
                                    retain_graph=retain_graph, allow_unused=True)
        return dict(zip(names, grads))

    def meta_grads(self, loss: Tensor, *, retain_graph: Optional[bool] = None) -> List[Tensor]:
        """``∂loss/∂φ``, zeros for meta-parameters the loss does not reach."""
        grads = torch.autograd.grad(loss, self.meta_params, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.meta_params, grads)]

    def leaf_params(self, params: Optional[Mapping[str, Tensor]] = None) -> Params:
        """Detached copies of θ that require grad (the start of a differentiable unroll)."""
        src = self.params if params is None else params
        trainable = self.optimizer.hypers  # read once: a fresh dict each access
        return {k: v.detach().requires_grad_(k in trainable) for k, v in src.items()}

    def run_inner_steps(self, *, create_graph: bool, return_grads: bool = False):
        """Take one optimizer step per train batch from θ. Returns the parameter trajectory ``[θ_0 .. θ_k]``
        and the optimizer states ``[s_0 .. s_k]`` (``s_t``: the state step ``t`` starts from; ``s_k`` the final
        one), and with ``return_grads`` also the gradient each step took ``[g_0 .. g_{k-1}]`` (so a method that
        needs them does not recompute them). With ``create_graph`` the trajectory is differentiable in φ."""
        theta = self.leaf_params()
        state = self.opt_state
        trajectory, states, step_grads = [theta], [state], []
        for batch in self.train_batches:
            grads = self.step_grads(self.inner_terms(theta, batch), theta, create_graph=create_graph)
            if not create_graph:
                grads = {k: (None if g is None else g.detach()) for k, g in grads.items()}
            step_grads.append(grads)
            theta, state = self.optimizer.step(theta, grads, state)
            if not create_graph:
                theta = self.leaf_params(theta)
                state = detach_state(state)
            trajectory.append(theta)
            states.append(state)
        return (trajectory, states, step_grads) if return_grads else (trajectory, states)


def detach_state(state: State) -> State:
    return {k: {n: v.detach() for n, v in st.items()} for k, st in state.items()}


def detach_params(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in params.items()}
