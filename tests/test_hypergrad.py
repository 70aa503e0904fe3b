"""Hypergradient methods against a float64 finite difference of the true bilevel objective, against higher,
and the approximate ones against what they approximate."""

import pytest
import torch

from bilevel_fixtures import OPTS, central_difference, dot, make_problem, random_direction
from metareweight import FiniteDifference, Neumann, Unrolled, get_hypergradient
from metareweight.core import BilevelProblem, FunctionalOptimizer, WeightedTerms



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
    else:  # SGD has no preconditioner: both modes agree exactly
        assert dot(grads, grads) == pytest.approx(dot(grads_full, grads_full), rel=1e-12)


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


def _ridge_problem(n=40, d=4, lam=0.5, seed=0):
    """Weighted ridge regression: L_in = Σ_i w_i(φ) (x_iᵀθ − y_i)² / n + λ‖θ‖²; strongly convex in θ, with a
    closed-form optimum θ*(φ), so the implicit hypergradient is known exactly."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(20, d, generator=g, dtype=torch.float64)
    yv = Xv @ torch.randn(d, generator=g, dtype=torch.float64)
    phi = torch.nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=torch.float64))

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))

        def forward(self, x):
            return x @ self.theta

    def inner(forward, batch):
        r = forward(batch.inputs) - batch.targets
        w = torch.sigmoid(phi)
        # the ridge penalty rides along as a second term per sample with a constant weight
        ridge = lam * (model_theta(forward) ** 2).sum() / n
        return WeightedTerms(torch.stack([r ** 2, ridge.expand(n)], 1),
                             torch.stack([w / n, torch.ones(n, dtype=w.dtype)], 1))

    def model_theta(forward):
        return forward(torch.eye(d, dtype=torch.float64))

    def outer(forward, batch):
        return ((forward(batch.inputs) - batch.targets) ** 2).mean()

    def optimum():
        w = torch.sigmoid(phi)
        A = (X.T * w) @ X / n + lam * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(A, (X.T * w) @ y / n)

    model = Linear()
    with torch.no_grad():
        model.theta.copy_(optimum())
    from metareweight.data import Batch
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    problem = BilevelProblem(model, {"theta": model.theta.detach()}, {}, FunctionalOptimizer.from_torch(opt, model),
                             {}, [phi], inner, outer, [Batch(X, y)], Batch(Xv, yv))
    true = torch.autograd.grad(((Xv @ optimum() - yv) ** 2).mean(), phi)[0]
    return problem, true


def test_neumann_converges_to_implicit_gradient():
    problem, true = _ridge_problem()
    errors = []
    for terms in (0, 5, 20, 80):
        g = Neumann(terms=terms, alpha=0.3, lookahead=False)(problem).grads[0]
        errors.append(float((g - true).norm() / true.norm()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 1e-4 < errors[0]


@pytest.mark.parametrize("name,opts,msg", [
    ("unroled", None, "Did you mean 'unrolled'"),
    ("neumann", {"iterations": 3}, "unknown option"),
    ("finite_difference", {"alpha": -1.0}, "positive"),
])
def test_bad_method_names_and_options(name, opts, msg):
    with pytest.raises(ValueError, match=msg):
        get_hypergradient(name, opts)
