"""The functional optimizers reproduce torch.optim step by step, including state written back."""

import copy

import pytest
import torch
from torch import nn

from metareweight import FunctionalOptimizer

CASES = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3)),
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("opt_cls,kw", CASES)
def test_functional_steps_match_torch(opt_cls, kw):
    net = _net()
    ref = copy.deepcopy(net)
    opt = opt_cls(net.parameters(), **kw)
    ref_opt = opt_cls(ref.parameters(), **kw)
    fopt = FunctionalOptimizer.from_torch(opt, net)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    state = fopt.read_state()
    x = torch.randn(16, 4, dtype=torch.float64)
    for _ in range(4):
        ref_opt.zero_grad()
        ref(x).pow(2).sum().backward()
        ref_opt.step()
        p = {k: v.requires_grad_() for k, v in params.items()}
        loss = torch.func.functional_call(net, p, (x,)).pow(2).sum()
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        params, state = fopt.step(p, grads, state)
        params = {k: v.detach() for k, v in params.items()}
    for k, v in ref.named_parameters():
        torch.testing.assert_close(params[k], v.detach(), rtol=1e-12, atol=1e-12)
    # writing the state back lets the real optimizer continue identically
    with torch.no_grad():
        for k, v in net.named_parameters():
            v.copy_(params[k])
    fopt.write_state(state, net)
    for model, o in ((net, opt), (ref, ref_opt)):
        o.zero_grad()
        model(x).pow(2).sum().backward()
        o.step()
    for (k, a), (_, b) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unsupported_optimizer_is_named():
    net = _net()
    with pytest.raises(TypeError, match="RMSprop"):
        FunctionalOptimizer.from_torch(torch.optim.RMSprop(net.parameters()), net)


def test_optimizer_with_foreign_parameter_is_rejected():
    net, other = _net(), _net()
    with pytest.raises(ValueError, match="not in the model"):
        FunctionalOptimizer.from_torch(torch.optim.SGD(other.parameters(), lr=0.1), net)


def test_adam_linear_scale_requires_fixed_preconditioner():
    net = _net()
    fopt = FunctionalOptimizer.from_torch(torch.optim.Adam(net.parameters()), net)
    params = {k: v.detach() for k, v in net.named_parameters()}
    with pytest.raises(ValueError, match="preconditioner='fixed'"):
        fopt.linear_scale(params, {k: torch.ones_like(v) for k, v in params.items()}, {})


def test_differentiable_adam_step_has_finite_derivative_where_gradients_are_zero():
    """A parameter with an exactly zero gradient (dead unit, constant-zero input) must not make the
    hypergradient NaN through d sqrt(v)/dv at v = 0."""
    net = nn.Linear(3, 1).double()
    fopt = FunctionalOptimizer.from_torch(torch.optim.Adam(net.parameters(), lr=0.1), net)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)  # the weight of input 1 gets a zero gradient
    params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
    loss = scale * torch.func.functional_call(net, params, (x,)).pow(2).sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
    new, _ = fopt.step(params, grads, {})
    (d,) = torch.autograd.grad(new["weight"].sum() + new["bias"].sum(), scale)
    assert torch.isfinite(d)
