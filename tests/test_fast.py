"""The fast exact one-step hypergradient: equal to the unrolled one and to a float64 finite difference of the true
bilevel objective on every capture rule and fallback; the trainer's reuse of its captures for the real step."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bilevel_fixtures import OPTS, central_difference, dot, make_problem, random_direction
from metareweight import Fast, MetaTrainer, MetaWeightNet, TensorIndexedDataset, Unrolled
from metareweight.core.hypergrad import fast as fast_module

pytestmark = pytest.mark.usefixtures("one_thread")




def _problem(kind, opt="momentum", direct=True):
    return make_problem(kind, OPTS[opt], direct=direct, warm_steps=2, preconditioner="fixed")


def _assert_close(a, b, rtol=1e-5):
    err = max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))
    assert err < rtol, err


def _linearised_fd(problem, direction, h=1e-5):
    """FD of the bilevel objective whose step is linear in g with the optimizer's scale frozen at this φ: what the
    fixed Adam preconditioner differentiates (equal to the true objective for the SGD family)."""
    theta = problem.leaf_params()
    batch = problem.train_batches[0]
    opt, state = problem.optimizer, problem.opt_state
    g0 = {k: v.detach() for k, v in problem.step_grads(problem.inner_terms(theta, batch), theta).items()}
    scale = opt.linear_scale(theta, g0, state)
    base = {k: (v + scale[k] * g0[k] if k in scale else v) for k, v in opt.step(theta, g0, state)[0].items()}

    def value(sign):
        with torch.no_grad():
            for p, d in zip(problem.meta_params, direction):
                p.add_(sign * h * d)
        g = problem.step_grads(problem.inner_terms(theta, batch), theta)
        new = {k: (v - scale[k] * g[k] if k in scale else v).detach() for k, v in base.items()}
        with torch.no_grad():
            out = float(problem.outer_loss(new))
            for p, d in zip(problem.meta_params, direction):
                p.sub_(sign * h * d)
        return out

    return (value(+1) - value(-1)) / (2 * h)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "embedding", "seq", "shared"])
@pytest.mark.parametrize("opt,direct", [("sgd", True), ("momentum", False), ("nesterov", True), ("adam", True),
                                        ("adamw", False)])
def test_fast_matches_unrolled_and_finite_difference(kind, opt, direct):
    problem = _problem(kind, opt, direct)
    method = Fast(gram="always")  # the Gram form wherever it applies (SGD family, Linear), direct form elsewhere
    grads = method(problem).grads
    _assert_close(grads, Unrolled()(problem).grads)
    paths = set(method.last_paths.values())
    assert paths <= {"gram", "direct"} and ("gram" in paths) == (opt not in ("adam", "adamw")), method.last_paths
    d = random_direction(problem, 1)
    fd = central_difference(problem, d) if opt not in ("adam", "adamw") else _linearised_fd(problem, d)
    assert dot(grads, d) == pytest.approx(fd, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "seq", "shared"])
def test_gram_and_direct_forms_agree(kind):
    problem = _problem(kind, "nesterov")
    gram, direct = Fast(gram="always"), Fast(gram="never")
    _assert_close(gram(problem).grads, direct(problem).grads, rtol=1e-10)
    assert set(direct.last_paths.values()) == {"direct"}
    # with lookahead the Gram weights are materialised and the products are formed without the low-rank forward
    ahead = Fast(gram="always", lookahead=True)
    _assert_close(ahead(problem).grads, direct(problem).grads, rtol=1e-10)
    assert "gram" in ahead.last_paths.values()


def _announced_once(call, match):
    """``call()`` warns once with ``match``; calling it again does not repeat the announcement."""
    with pytest.warns(UserWarning, match=match):
        out = call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()
    return out


@pytest.mark.parametrize("kind", ["groupnorm", "tied"])  # (LayerNorm has a closed form now: see below)
def test_layers_without_closed_form_fall_back_to_jvp_exactly(kind, monkeypatch):
    monkeypatch.setattr(fast_module, "_ANNOUNCED", set())  # announcements are once per process
    problem = _problem(kind)
    method = Fast()
    grads = _announced_once(lambda: method(problem).grads, "no closed form for .* forward-mode JVP")
    assert "jvp" in method.last_paths.values() and "direct" in method.last_paths.values(), method.last_paths
    _assert_close(grads, Unrolled()(problem).grads)
    _assert_close(grads, Fast(closed_forms=False)(problem).grads, rtol=1e-10)
    d = random_direction(problem, 2)
    assert dot(grads, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("kind", ["batchnorm", "centered"])
def test_samples_that_interact_take_the_exact_jvp_path(kind, monkeypatch):
    # BatchNorm in train mode is detected up front; a custom batch-mean layer by the first-call check, announced
    monkeypatch.setattr(fast_module, "_ANNOUNCED", set())
    problem = _problem(kind)
    method = Fast()
    if kind == "centered":
        grads = _announced_once(lambda: method(problem).grads, "samples of .* interact")
    else:
        grads = method(problem).grads
    assert set(method.last_paths.values()) == {"jvp"}
    _assert_close(grads, Unrolled()(problem).grads)
    d = random_direction(problem, 3)
    assert dot(grads, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-10)
    # the real step from the kept train graph (one backward, no forward): the weighted gradient at θ
    batch = problem.train_batches[0]
    theta = problem.leaf_params()
    true = problem.step_grads(problem.inner_terms(theta, batch), theta)
    _, replayed = method.replay(batch)
    assert set(replayed) == set(true)
    for n, g in true.items():
        torch.testing.assert_close(replayed[n], g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_lookahead_parameters_and_state_equal_the_optimizers_step(opt):
    """``Fast(lookahead=True)`` forms its virtual step in place; what ``real_step="lookahead"`` commits (θ' and the
    optimizer state after the step) equals the functional optimizer's step that ``unrolled`` takes."""
    problem = _problem("mlp", opt)
    ours, ref = Fast(lookahead=True)(problem).lookahead, Unrolled()(problem).lookahead
    for a, b in zip(ours, ref):
        assert set(a) == set(b)
    for n in ref[0]:
        torch.testing.assert_close(ours[0][n], ref[0][n], rtol=1e-12, atol=1e-14)
        assert set(ours[1].get(n, {})) == set(ref[1].get(n, {}))
        for k, v in ref[1].get(n, {}).items():
            torch.testing.assert_close(ours[1][n][k], v, rtol=1e-12, atol=1e-14)


def test_refuses_what_it_cannot_do_exactly():
    with pytest.raises(ValueError, match="one inner step"):
        Fast()(make_problem("mlp", unroll=2))
    with pytest.raises(ValueError, match="adam_preconditioner='fixed'"):
        Fast()(make_problem("mlp", OPTS["adam"]))
    with pytest.raises(ValueError, match="gram"):
        Fast(gram="sometimes")


def _trainer(hypergrad, seed=0, **kw):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ds = TensorIndexedDataset(x, y)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    objective = MetaWeightNet(hidden=8).double()
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), DataLoader(ds, 16),
                       objective=objective, meta_loader=DataLoader(ds, 16, shuffle=True), hypergrad=hypergrad,
                       progress=False, **kw)


def _params(trainer):
    return [p.detach() for p in list(trainer.model.parameters()) + trainer.objective.meta_parameters()]


def test_training_with_fast_equals_training_with_unrolled():
    runs = []
    for method in ("unrolled", "fast"):
        trainer = _trainer(method)
        trainer.fit(epochs=4)  # 20 steps, every one a meta step
        assert trainer.global_step == 20 and trainer.meta_steps == 20
        runs.append(_params(trainer))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_real_step_reuses_the_captures_and_matches_recompute():
    runs, forwards = [], []
    for reuse in (True, False):
        trainer = _trainer(Fast(gram="always"), meta_interval=2)
        if not reuse:
            trainer.method.replay = lambda batch: None
        calls = []
        trainer.model.register_forward_hook(lambda *a: calls.append(1))
        trainer.fit(epochs=2)  # 10 steps, 5 meta steps
        assert trainer.meta_steps == 5
        runs.append(_params(trainer))
        forwards.append(len(calls))
    # a meta step runs the model twice (train batch, meta batch) instead of three times; a plain step once
    assert forwards == [5 * 2 + 5, 5 * 3 + 5]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_several_terms_per_sample():
    # K = 2 terms per sample (cross-entropy and a logit penalty), each with its own weight
    from metareweight import WeightedTerms

    problem = _problem("seq", "momentum")
    inner = problem.inner

    def two_terms(forward, batch):
        out = forward(batch.inputs)
        wt = inner(lambda x: out, batch)
        penalty = (out ** 2).mean(1)
        return WeightedTerms(torch.stack([wt.terms[:, 0], penalty], 1),
                             torch.stack([wt.weights[:, 0], 0.1 * wt.weights[:, 0] ** 2], 1))

    problem.inner = two_terms
    for gram in ("always", "never"):
        _assert_close(Fast(gram=gram)(problem).grads, Unrolled()(problem).grads)
    d = random_direction(problem, 4)
    assert dot(Fast()(problem).grads, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-10)
