"""First-order hypergradient by a finite difference of mixed second derivatives (DARTS; Betty's ``darts``).

With ``v = ∇_θ L_out(θ_k)`` and ``P`` the optimizer's linear step scale (``lr`` for SGD), the hypergradient is
approximated as

    dL_out/dφ ≈ ∂L_out/∂φ − Σ_t ∇²_{φθ} L_in(θ_t; B_t) · (P v)
    ∇²_{φθ} L_in · u ≈ [∇_φ L_in(θ_t + εu) − ∇_φ L_in(θ_t − εu)] / (2ε),   ε = alpha / ‖u‖

i.e. each inner step's Jacobian ``∂θ_{t+1}/∂θ_t`` is taken as the identity. For one SGD step this is the exact
one-step hypergradient up to the O(ε²) error of the central difference; for more steps it is the truncated
approximation Betty and DreamPRM use. ``scale=1.0`` reproduces Betty exactly (no learning-rate factor).
Cost: two extra forward/backward passes per inner step, no second-order graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..problem import BilevelProblem, HypergradResult, detach_params
from .base import HypergradMethod


@dataclass
class FiniteDifference(HypergradMethod):
    """DARTS-style finite-difference hypergradient.

    Args:
        alpha: the perturbation size relative to ``‖P v‖`` (Betty's ``darts_alpha``).
        scale: ``"optimizer"`` uses the optimizer's own step scale ``P``; a number uses that constant instead.
    """

    alpha: float = 0.01
    scale: Union[str, float] = "optimizer"
    name = "finite_difference"
    exact = False

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"finite_difference alpha must be positive, got {self.alpha}")
        if isinstance(self.scale, str) and self.scale != "optimizer":
            raise ValueError(f"scale must be 'optimizer' or a number, got {self.scale!r}")

    def __call__(self, problem: BilevelProblem) -> HypergradResult:
        trajectory, states = problem.run_inner_steps(create_graph=False)
        theta_k = trajectory[-1]
        outer = problem.outer_loss(theta_k)
        names = problem.trainable(theta_k)
        v = torch.autograd.grad(outer, [theta_k[n] for n in names], retain_graph=True, allow_unused=True)
        v = {n: g for n, g in zip(names, v) if g is not None}
        grads = problem.meta_grads(outer)
        for theta, batch, state_t in zip(trajectory[:-1], problem.train_batches, states):
            u = self._scaled(problem, theta, batch, v, state_t)  # step t's own scale, from the state it starts from
            mixed = self.mixed_derivative(problem, theta, batch, u)
            grads = [g - m for g, m in zip(grads, mixed)]
        return HypergradResult(grads, float(outer.detach()), (detach_params(theta_k), states[-1]))

    def _scaled(self, problem, theta, batch, v, state):
        if not isinstance(self.scale, str):
            return {n: self.scale * g for n, g in v.items()}
        with torch.enable_grad():
            g = problem.step_grads(problem.inner_terms(theta, batch), theta)
        scale = problem.optimizer.linear_scale(theta, g, state)
        return {n: scale[n] * t for n, t in v.items() if n in scale}

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
