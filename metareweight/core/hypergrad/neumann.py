"""Implicit hypergradient with a truncated Neumann series for the inverse Hessian.

At (approximately) optimal inner parameters θ*, the implicit function theorem gives

    dL_out/dφ = ∂L_out/∂φ − ∇²_{φθ} L_in · H⁻¹ ∇_θ L_out,     H = ∇²_θθ L_in
    H⁻¹ v ≈ α Σ_{j=0..terms} (I − αH)^j v                      (converges when 0 < α < 2/λ_max(H))

evaluated after the inner steps (``lookahead=True``, the usual choice) or at the current θ. Exact only at an inner
optimum and in the limit of many terms; tests check convergence to the implicit-function gradient on a strongly
convex inner problem. Cost: ``terms`` Hessian-vector products plus one mixed product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..problem import BilevelProblem, HypergradResult, detach_params
from .base import HypergradMethod


@dataclass
class Neumann(HypergradMethod):
    """Neumann-series implicit hypergradient.

    Args:
        terms: number of Neumann terms (Betty's ``neumann_iterations``).
        alpha: the series step ``α``; ``None`` uses the learning rate of the first parameter group.
        lookahead: evaluate after the inner steps (True) or at the current parameters (False).
    """

    terms: int = 10
    alpha: Optional[float] = None
    lookahead: bool = True
    name = "neumann"
    exact = False

    def __post_init__(self):
        if self.terms < 0:
            raise ValueError(f"neumann terms must be >= 0, got {self.terms}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"neumann alpha must be positive, got {self.alpha}")

    def __call__(self, problem: BilevelProblem) -> HypergradResult:
        if self.lookahead:
            trajectory, states = problem.run_inner_steps(create_graph=False)
            theta, state = trajectory[-1], states[-1]
        else:
            theta, state = problem.leaf_params(), problem.opt_state
        alpha = self.alpha if self.alpha is not None else next(iter(problem.optimizer.hypers.values())).lr
        outer = problem.outer_loss(theta)
        names = problem.trainable(theta)
        v = torch.autograd.grad(outer, [theta[n] for n in names], retain_graph=True, allow_unused=True)
        v = [torch.zeros_like(theta[n]) if g is None else g.detach() for n, g in zip(names, v)]
        direct = problem.meta_grads(outer)

        batch = problem.train_batches[-1]
        g = problem.step_grads(problem.inner_terms(theta, batch), theta, create_graph=True)
        g = [torch.zeros_like(theta[n]) if g[n] is None else g[n] for n in names]
        p = [t.clone() for t in v]
        cur = v
        for _ in range(self.terms):
            hv = torch.autograd.grad(g, [theta[n] for n in names], grad_outputs=cur, retain_graph=True,
                                     allow_unused=True)
            cur = [c - alpha * (torch.zeros_like(c) if h is None else h) for c, h in zip(cur, hv)]
            p = [a + c for a, c in zip(p, cur)]
        p = [alpha * t for t in p]
        dot = sum((gi * pi).sum() for gi, pi in zip(g, p))
        mixed = problem.meta_grads(dot)
        grads = [d - m for d, m in zip(direct, mixed)]
        return HypergradResult(grads, float(outer.detach()), (detach_params(theta), state))
