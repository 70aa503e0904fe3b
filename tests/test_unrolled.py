"""The unrolled (exact, reverse-mode) hypergradient against a float64 finite difference of the true bilevel
objective and against higher."""

import dataclasses

import pytest
import torch

from bilevel_fixtures import OPTS, bilevel_value, central_difference, dot, make_problem, random_direction
from metareweight import Unrolled
from metareweight.core import FunctionalOptimizer


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("unroll", [1, 3])
@pytest.mark.parametrize("direct", [False, True])
def test_unrolled_matches_finite_difference_of_true_objective(kind, opt, unroll, direct):
    problem = make_problem(kind, OPTS[opt], unroll=unroll, direct=direct, warm_steps=2)
    grads = Unrolled()(problem).grads
    for seed in (1, 2):
        d = random_direction(problem, seed)
        fd = central_difference(problem, d)
        assert dot(grads, d) == pytest.approx(fd, rel=1e-6, abs=1e-10)


class _FrozenDenominator(FunctionalOptimizer):
    """Adam/AdamW written out independently, with each step's denominator ``sqrt(v̂)+eps`` replayed from a recorded
    run: the bilevel objective whose preconditioner is a constant, frozen at its value for the current φ."""

    def __init__(self, base):
        super().__init__(base.hypers, base.optimizer, base._names, "differentiable")
        self.denominators, self.replay = [], None

    def _adam(self, p, g, st, h):
        assert h.decoupled and not h.amsgrad, "written out for AdamW without amsgrad only"
        t = float(st.get("step", torch.tensor(0.0))) + 1
        st["step"] = torch.tensor(t)
        if h.decoupled:
            p = p * (1 - h.lr * h.weight_decay)
        m = h.beta1 * st.get("exp_avg", torch.zeros_like(p)) + (1 - h.beta1) * g
        v = h.beta2 * st.get("exp_avg_sq", torch.zeros_like(p)) + (1 - h.beta2) * g.detach() ** 2
        st["exp_avg"], st["exp_avg_sq"] = m, v
        if self.replay is None:
            denom = (v / (1 - h.beta2 ** t)).sqrt() + h.eps
            self.denominators.append(denom.detach())
        else:
            denom = next(self.replay)
        return p - h.lr / (1 - h.beta1 ** t) * m / denom


@pytest.mark.parametrize("opt", ["sgd", "nesterov", "adamw"])
def test_unrolled_with_fixed_adam_preconditioner_matches_finite_difference(opt):
    problem = make_problem("mlp", OPTS[opt], unroll=2, preconditioner="fixed", warm_steps=2, direct=True)
    # the "fixed" objective treats the preconditioner as a constant function of the *current* gradient, so the
    # bilevel value itself is unchanged; only its derivative differs. Compare against the FD of a problem whose
    # preconditioner is frozen at its value for this φ.
    grads = Unrolled()(problem).grads
    grads_full = Unrolled()(make_problem("mlp", OPTS[opt], unroll=2, warm_steps=2, direct=True)).grads
    if opt == "adamw":
        assert dot(grads, grads) != pytest.approx(dot(grads_full, grads_full), rel=1e-6)
        frozen = _FrozenDenominator(problem.optimizer)
        oracle = dataclasses.replace(problem, optimizer=frozen)
        value = bilevel_value(oracle)  # records the denominators at φ
        assert value == pytest.approx(bilevel_value(problem), rel=1e-12)  # the same objective value at φ
        assert len(frozen.denominators) == 2 * 4  # 2 steps x 4 parameter tensors
    else:  # SGD has no preconditioner: both modes agree exactly, and the oracle is the true objective itself
        assert dot(grads, grads) == pytest.approx(dot(grads_full, grads_full), rel=1e-12)
        oracle = problem
    for seed in (1, 2):
        d = random_direction(problem, seed)
        if opt == "adamw":
            frozen.replay = _Cycle(frozen.denominators)
        assert dot(grads, d) == pytest.approx(central_difference(oracle, d), rel=1e-6, abs=1e-10)
    if opt == "adamw":  # and the frozen objective is not the true one: its difference misses the fixed gradient
        d = random_direction(problem, 1)
        assert dot(grads, d) != pytest.approx(central_difference(problem, d), rel=1e-3)


class _Cycle:
    """The recorded denominators in order, again for each run of the inner steps."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __next__(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def test_unrolled_agrees_with_higher():
    higher = pytest.importorskip("higher", reason="higher is an optional oracle (pip install higher)")
    # higher differentiates the plain loss Σ w ℓ, so give it weights whose features are detached (then the
    # step directions agree by construction)
    problem = make_problem("mlp", OPTS["momentum"], unroll=2, direct=True, warm_steps=0, detach_features=True)
    ours = Unrolled()(problem).grads

    model = problem.model
    opt = torch.optim.SGD(model.parameters(), **OPTS["momentum"][1])
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for b in problem.train_batches:
            wt = problem.inner(fmodel, b)
            diffopt.step((wt.weights * wt.terms).sum())
        outer = problem.outer(fmodel, problem.meta_batch)
        theirs = torch.autograd.grad(outer, problem.meta_params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
