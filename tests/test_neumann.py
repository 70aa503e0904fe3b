"""The Neumann (implicit) hypergradient converges to the closed-form implicit gradient of a strongly convex problem."""

import torch

from metareweight import Neumann
from metareweight.core import BilevelProblem, FunctionalOptimizer, WeightedTerms


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
