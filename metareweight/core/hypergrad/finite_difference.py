"""First-order hypergradient by a finite difference of mixed second derivatives (DARTS; Betty's ``darts``).

With ``v = ∇_θ L_out(θ_k)`` and ``P`` the optimizer's linear step scale (``lr`` for SGD), the hypergradient is
approximated as

    dL_out/dφ ≈ ∂L_out/∂φ − Σ_t ∇²_{φθ} L_in(θ_t; B_t) · (P v)
    ∇²_{φθ} L_in · u ≈ [∇_φ L_in(θ_t + εu) − ∇_φ L_in(θ_t − εu)] / (2ε),   ε = alpha / ‖u‖

i.e. each inner step's Jacobian ``∂θ_{t+1}/∂θ_t`` is taken as the identity. For one SGD step this is the exact
one-step hypergradient up to the O(ε²) error of the central difference; for more steps it is the truncated
approximation Betty and DreamPRM use. ``scale=1.0`` reproduces Betty exactly (no learning-rate factor).
Cost: two extra forward/backward passes per inner step, no second-order graph.

With a stateful optimizer the truncation also drops what a step's gradient does *after* that step: it stays in
the momentum buffer (Adam's first moment) and moves every later step too. ``optimizer_carry=True`` keeps that:
``P v`` becomes ``J_tᵀ v`` with ``J_t = ∂θ_k/∂g_t`` through the optimizer's own update rule from step ``t`` to the
last (momentum, nesterov, weight decay, Adam's moments with the preconditioner held fixed), for all ``t`` by one
backward pass through a replay of the optimizer's updates; only the loss Hessian is dropped. So for inner losses
linear in θ it is exact for any number of steps, and otherwise closer to the exact hypergradient
(``tests/test_domain_weights.py`` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from ..optim import NONLINEAR_STEP, FunctionalOptimizer
from ..problem import BilevelProblem, HypergradResult, detach_params
from .base import HypergradMethod


@dataclass
class FiniteDifference(HypergradMethod):
    """DARTS-style finite-difference hypergradient.

    Args:
        alpha: the perturbation size relative to ``‖P v‖`` (Betty's ``darts_alpha``).
        scale: ``"optimizer"`` uses the optimizer's own step scale ``P``; a number uses that constant instead.
        optimizer_carry: carry each step's gradient through the optimizer's state to the last step (see the module
            docs); needs ``scale="optimizer"``.

    Example:
        >>> FiniteDifference(optimizer_carry=True).exact
        False
    """

    alpha: float = 0.01
    scale: Union[str, float] = "optimizer"
    optimizer_carry: bool = False
    name = "finite_difference"
    exact = False
    returns_lookahead = True

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"finite_difference alpha must be positive, got {self.alpha}")
        if isinstance(self.scale, str) and self.scale != "optimizer":
            raise ValueError(f"scale must be 'optimizer' or a number, got {self.scale!r}")
        if self.optimizer_carry and not isinstance(self.scale, str):
            raise ValueError("optimizer_carry follows the optimizer's own update rule; it needs scale='optimizer'")

    def __call__(self, problem: BilevelProblem) -> HypergradResult:
        trajectory, states, step_grads = problem.run_inner_steps(create_graph=False, return_grads=True)
        theta_k = trajectory[-1]
        outer = problem.outer_loss(theta_k)
        names = problem.trainable(theta_k)
        v = torch.autograd.grad(outer, [theta_k[n] for n in names], retain_graph=True, allow_unused=True)
        v = {n: g for n, g in zip(names, v) if g is not None}
        grads = problem.meta_grads(outer)
        steps = list(zip(trajectory[:-1], problem.train_batches, states, step_grads))
        carried = self._carried(problem, trajectory, states, step_grads, v) if self.optimizer_carry else []
        for t, (theta, batch, state_t, g_t) in enumerate(steps):
            if self.optimizer_carry:
                u = carried[t]
            else:
                u = self._scaled(problem, theta, g_t, v, state_t)  # step t's own scale, from its starting state
            mixed = self.mixed_derivative(problem, theta, batch, u)
            grads = [g - m for g, m in zip(grads, mixed)]
        return HypergradResult(grads, float(outer.detach()), (detach_params(theta_k), states[-1]))

    def _scaled(self, problem, theta, g, v, state):
        """``P_t v``: ``v`` times step ``t``'s own scale (``g``: the gradient that step took)."""
        if not isinstance(self.scale, str):
            return {n: self.scale * x for n, x in v.items()}
        scale = problem.optimizer.linear_scale(theta, g, state)
        return {n: scale[n] * t for n, t in v.items() if n in scale}

    @staticmethod
    def _carried(problem, trajectory, states, step_grads: List[Dict[str, Optional[Tensor]]], v) -> List[Dict]:
        """``J_tᵀ v`` for every step ``t``, ``J_t = ∂θ_k/∂g_t`` through the optimizer's update rule alone: the
        steps are replayed from ``θ_0`` with the recorded gradients as leaves and one backward pass from ``θ_k``
        with cotangent ``v`` (element-wise updates, so ``J_t`` is diagonal and the pass costs a few vector ops)."""
        opt = problem.optimizer
        if not opt.steps_linearly:
            raise ValueError(NONLINEAR_STEP)
        if problem.collectives.enabled:  # data-parallel: the trajectory took the ranks' mean gradient; replay that,
            step_grads = [_rank_mean(g, problem.collectives) for g in step_grads]  # with the plain update rule
        with torch.enable_grad():
            leaves = [{n: (x.detach().requires_grad_() if x is not None and n in v else x) for n, x in g.items()}
                      for g in step_grads]
            theta, state = {k: x.detach() for k, x in trajectory[0].items()}, states[0]
            for g in leaves:
                theta, state = FunctionalOptimizer.step(opt, theta, g, state)
            names = [n for n in v if theta[n].requires_grad]
            slots = [(t, n) for t, g in enumerate(leaves) for n, x in g.items() if x is not None and n in v]
            got = torch.autograd.grad([theta[n] for n in names], [leaves[t][n] for t, n in slots],
                                      grad_outputs=[v[n] for n in names], allow_unused=True)
        out: List[Dict[str, Tensor]] = [{} for _ in leaves]
        for (t, n), x in zip(slots, got):
            if x is not None:
                out[t][n] = -x
        return out

    def mixed_derivative(self, problem: BilevelProblem, theta, batch, u):
        """``∂/∂φ [Σ_ik w_ik(φ) ∇ℓ_ik(θ)·u]`` by a central difference of the loss terms along ``u``.

        The weights are evaluated once at θ, so only the terms move: this is the derivative of the inner step
        direction, which is what the hypergradient needs (weights are constants of the step in θ)."""
        norm = torch.sqrt(sum((t.detach() ** 2).sum() for t in u.values()))
        if float(norm) == 0.0:
            return [torch.zeros_like(p) for p in problem.meta_params]
        eps = self.alpha / norm
        weights = problem.inner_terms(theta, batch).weights

        def terms_at(sign: float):
            with torch.no_grad():
                shifted = {k: (t.detach() + sign * eps * u[k] if k in u else t.detach()) for k, t in theta.items()}
                return problem.inner_terms(shifted, batch).terms

        diff = (terms_at(+1.0) - terms_at(-1.0)) / (2 * eps)
        return problem.meta_grads((weights * diff).sum())


def _rank_mean(grads: Dict[str, Optional[Tensor]], collectives) -> Dict[str, Optional[Tensor]]:
    """A copy of ``grads`` averaged across ranks (``None`` entries kept), outside autograd."""
    out = {n: (None if g is None else g.detach().clone()) for n, g in grads.items()}
    collectives.all_reduce_mean_(list(out.values()))
    return out
