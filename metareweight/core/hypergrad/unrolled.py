"""Exact hypergradient by differentiating through the inner optimizer steps.

Cost: one extra forward/backward per inner step plus a double-backward; memory grows linearly with the number of
unrolled steps (every step's graph is kept until the outer backward). Works for any module and any supported
optimizer, including Adam's moment estimates (or with them held fixed, ``FunctionalOptimizer(preconditioner="fixed")``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..problem import BilevelProblem, HypergradResult, detach_params, detach_state
from .base import HypergradMethod


@dataclass
class Unrolled(HypergradMethod):
    """``dL_out(θ_k(φ), φ)/dφ`` through ``k`` differentiable optimizer steps (exact).

    Example:
        >>> Unrolled().exact
        True
    """

    name = "unrolled"
    exact = True
    returns_lookahead = True

    def __call__(self, problem: BilevelProblem) -> HypergradResult:
        trajectory, states = problem.run_inner_steps(create_graph=True)
        theta, state = trajectory[-1], states[-1]
        outer = problem.outer_loss(theta)
        grads = problem.meta_grads(outer)
        return HypergradResult(grads, float(outer.detach()), (detach_params(theta), detach_state(state)))
