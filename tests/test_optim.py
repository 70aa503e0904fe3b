"""The functional optimizers reproduce torch.optim step by step, including state written back."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from bilevel_fixtures import OPTS, dot, make_problem
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


# ---- hyper-parameters are read live from the torch optimizer -------------------------------------------------------
def _with_fresh_mirror(problem):
    """The same problem with its optimizer mirrored anew from the torch optimizer (the reference)."""
    fresh = FunctionalOptimizer.from_torch(problem.optimizer.optimizer, problem.model, problem.optimizer.preconditioner)
    return dataclasses.replace(problem, optimizer=fresh)


def _methods():
    from metareweight import available_methods, get_hypergradient
    return [get_hypergradient(m) for m in ("unrolled", "fast") if m in available_methods()]


LIVE_CASES = [("momentum", "differentiable"), ("adam", "differentiable"), ("adam", "fixed")]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("opt,preconditioner", LIVE_CASES)
@pytest.mark.parametrize("change", ["by_hand", "scheduler"])
def test_changed_hyper_parameters_give_the_hypergradient_of_a_freshly_mirrored_optimizer(opt, preconditioner, change):
    """A learning rate changed by hand, or by a scheduler stepped outside any trainer, after the functional optimizer
    was built: the virtual step uses the new value (an earlier version copied the value at build time, and the
    hypergradient was then off by 82 % relative, silently)."""
    fast_ok = not (opt == "adam" and preconditioner == "differentiable")  # fast needs Adam's "fixed" preconditioner
    methods = [m for m in _methods() if fast_ok or m.name == "unrolled"]
    assert len(methods) == (2 if fast_ok else 1) or "fast" not in [m.name for m in _methods()]
    for method in methods:
        unroll = 1 if method.name == "fast" else 2  # fast is exact for one inner step
        problem = make_problem("mlp", OPTS[opt], unroll=unroll, direct=True, warm_steps=2,
                               preconditioner=preconditioner)
        torch_opt = problem.optimizer.optimizer
        old = method(problem).grads
        if change == "by_hand":
            torch_opt.param_groups[0]["lr"] *= 0.3
            if opt == "momentum":
                torch_opt.param_groups[0]["momentum"] = 0.5
            else:
                torch_opt.param_groups[0]["betas"] = (0.8, 0.99)
        else:
            torch.optim.lr_scheduler.StepLR(torch_opt, step_size=1, gamma=0.3).step()
        assert problem.optimizer.hypers["0.weight"].lr == pytest.approx(torch_opt.param_groups[0]["lr"])
        live, fresh = method(problem).grads, method(_with_fresh_mirror(problem)).grads
        for a, b in zip(live, fresh):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        diff = [a - b for a, b in zip(live, old)]
        assert dot(diff, diff) ** 0.5 > 1e-3 * dot(old, old) ** 0.5, method.name  # the change reached the result


def test_every_hyper_parameter_is_read_at_each_access():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    fopt = FunctionalOptimizer.from_torch(opt, net)
    opt.param_groups[0].update(lr=0.5, betas=(0.5, 0.6), eps=1e-3, weight_decay=0.2, amsgrad=True)
    h = fopt.hypers["0.weight"]
    assert (h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.amsgrad) == (0.5, 0.5, 0.6, 1e-3, 0.2, True)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    fsgd = FunctionalOptimizer.from_torch(sgd, net)
    sgd.param_groups[0].update(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-3)
    h = fsgd.hypers["2.bias"]
    assert (h.momentum, h.dampening, h.weight_decay) == (0.9, 0.1, 1e-3)
    sgd.param_groups[0]["maximize"] = True
    with pytest.raises(ValueError, match="maximize=True"):
        fsgd.step({}, {}, {})


def test_parameters_frozen_after_the_mirror_was_built_are_not_stepped():
    net = _net()
    fopt = FunctionalOptimizer.from_torch(torch.optim.SGD(net.parameters(), lr=0.1), net)
    net[0].weight.requires_grad_(False)
    assert "0.weight" not in fopt.param_names and "0.bias" in fopt.param_names
    params = {k: v.detach() for k, v in net.named_parameters()}
    new, _ = fopt.step(params, {k: torch.ones_like(v) for k, v in params.items()}, {})
    assert new["0.weight"] is params["0.weight"] and not torch.equal(new["0.bias"], params["0.bias"])


def test_a_deep_copy_mirrors_the_copied_optimizer():
    """Deep-copying model, optimizer and mirror together (as ``copy.deepcopy(trainer)`` does) mirrors the copies."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net2, opt2, fopt2 = copy.deepcopy((net, opt, FunctionalOptimizer.from_torch(opt, net)))
    opt2.param_groups[0]["lr"] = 0.7
    assert fopt2.param_names == [n for n, _ in net.named_parameters()]
    assert {h.lr for h in fopt2.hypers.values()} == {0.7}
