"""The finite-difference (DARTS) hypergradient: its mixed derivative against the exact one, one SGD step against the
unrolled hypergradient, and the optimizer scaling of each step."""

import pytest
import torch

from bilevel_fixtures import OPTS, make_problem
from metareweight import FiniteDifference, Unrolled


def test_finite_difference_matches_exact_mixed_second_derivative():
    problem = make_problem("mlp", OPTS["sgd"], unroll=1, direct=True)
    fd_method = FiniteDifference(alpha=1e-4)
    theta = problem.leaf_params()
    batch = problem.train_batches[0]
    g = torch.Generator().manual_seed(3)
    u = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta.items()}
    approx = fd_method.mixed_derivative(problem, theta, batch, u)
    step = problem.step_grads(problem.inner_terms(theta, batch), theta, create_graph=True)
    exact = torch.autograd.grad(sum((step[k] * u[k]).sum() for k in theta), problem.meta_params)
    for a, e in zip(approx, exact):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)


def test_finite_difference_approximates_one_sgd_step_exactly():
    # for one plain SGD step the only approximation is the O(ε²) central difference
    problem = make_problem("mlp", OPTS["sgd"], unroll=1, direct=True)
    exact = Unrolled()(problem).grads
    approx = FiniteDifference(alpha=1e-5)(problem).grads
    for a, e in zip(approx, exact):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("opt", ["adam", "momentum"])
def test_finite_difference_scales_each_step_with_the_state_that_step_starts_from(opt):
    # the k-step DARTS sum is Σ_t mixed(θ_t, P_t v) with P_t from the optimizer state *before step t*; an earlier
    # version used an empty state for t > 0 (for a warm Adam that is lr/|g| per coordinate, a 6-50x error)
    problem = make_problem("mlp", OPTS[opt], unroll=3, preconditioner="fixed", warm_steps=3, direct=True)
    method = FiniteDifference(alpha=1e-4)
    trajectory, states = problem.run_inner_steps(create_graph=False)
    if opt == "adam":  # s_t is the state step t starts from: 3 warm steps, then one per inner step
        assert [float(s["0.weight"]["step"]) for s in states] == [3.0, 4.0, 5.0, 6.0]
    theta_k = trajectory[-1]
    names = problem.trainable(theta_k)
    v = dict(zip(names, torch.autograd.grad(problem.outer_loss(theta_k), [theta_k[n] for n in names])))
    expected = list(problem.meta_grads(problem.outer_loss(theta_k)))
    for theta, batch, state in zip(trajectory[:-1], problem.train_batches, states):
        g = problem.step_grads(problem.inner_terms(theta, batch), theta)
        scale = problem.optimizer.linear_scale(theta, g, state)
        u = {n: scale[n] * v[n] for n in v}
        expected = [e - m for e, m in zip(expected, method.mixed_derivative(problem, theta, batch, u))]
    for a, e in zip(method(problem).grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
