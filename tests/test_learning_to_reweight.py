"""Learning to Reweight: the hypergradient w.r.t. the per-example ε against a float64 finite difference of the true
bilevel objective, and the real step's weights and update through MetaStep."""

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader

from bilevel_fixtures import OPTS, batches, central_difference, dot, mlp, random_direction
from metareweight import (Batch, BilevelProblem, Fast, LearningToReweight, MetaStep, MetaTrainer,
                          TensorIndexedDataset, Unrolled)
from metareweight.losses import cross_entropy_terms


def _setup(opt_name, seed=0, warm_steps=3):
    torch.manual_seed(seed)
    model = mlp().double()
    opt_cls, kw = OPTS[opt_name]
    optimizer = opt_cls(model.parameters(), **kw)
    for b in batches("mlp", 8, warm_steps, seed + 100):  # non-trivial momentum / Adam state
        optimizer.zero_grad()
        cross_entropy_terms(model(b.inputs), b.targets).mean().backward()
        optimizer.step()
    train = batches("mlp", 8, 1, seed + 1)[0]
    train.index = torch.arange(8)
    return model, optimizer, train, batches("mlp", 10, 1, seed + 2)[0]


def _problem(model, optimizer, objective, train, meta, preconditioner="differentiable"):
    """The bilevel problem in ε alone (what MetaStep builds for this objective)."""
    (eps,) = objective.init_batch_variables(train)
    base = BilevelProblem.from_model(model, optimizer, objective, [train], meta, preconditioner)
    return dataclasses.replace(base, meta_params=[eps], inner=lambda f, b: objective.inner_terms(f, b, eps))


@pytest.mark.parametrize("method,opt_name", [("unrolled", "sgd"), ("unrolled", "momentum"), ("unrolled", "adam"),
                                             ("fast", "sgd"), ("fast", "momentum"), ("fast", "adam")])
def test_epsilon_hypergradient_matches_a_float64_finite_difference(method, opt_name):
    model, optimizer, train, meta = _setup(opt_name)
    objective = LearningToReweight()
    preconditioner = "fixed" if method == "fast" else "differentiable"
    problem = _problem(model, optimizer, objective, train, meta, preconditioner)
    assert problem.meta_params[0].dtype == torch.float64 and not problem.meta_params[0].any()
    grads = (Unrolled() if method == "unrolled" else Fast())(problem).grads
    assert len(grads) == 1 and grads[0].shape == (8,) and float(grads[0].abs().max()) > 1e-4
    for seed in (7, 8):
        direction = random_direction(problem, seed)
        assert dot(grads, direction) == pytest.approx(central_difference(problem, direction), rel=1e-6, abs=1e-10)


def test_sgd_epsilon_gradient_is_the_scaled_gradient_alignment():
    """At ε = 0 with plain SGD: ∂L_meta/∂ε_i = −η ∇L_meta(θ)·∇ℓ_i(θ) (the paper's closed form)."""
    model, optimizer, train, meta = _setup("sgd", warm_steps=0)
    grads = Unrolled()(_problem(model, optimizer, LearningToReweight(), train, meta)).grads[0]
    params = list(model.parameters())
    g_meta = torch.autograd.grad(cross_entropy_terms(model(meta.inputs), meta.targets).mean(), params)
    losses = cross_entropy_terms(model(train.inputs), train.targets)
    for i in range(8):
        g_i = torch.autograd.grad(losses[i], params, retain_graph=True)
        expected = -0.3 * sum(float((a * b).sum()) for a, b in zip(g_meta, g_i))
        assert float(grads[i]) == pytest.approx(expected, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("method", ["unrolled", "fast"])
def test_meta_step_weighs_the_real_step_with_the_normalised_positive_part(method):
    model, optimizer, train, meta = _setup("momentum")
    objective = LearningToReweight()
    reference = _problem(model, optimizer, objective, train, meta, "fixed")
    g = Unrolled()(reference).grads[0]
    expected = torch.clamp(-g, min=0)
    expected = expected / expected.sum()
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = cross_entropy_terms(model(train.inputs), train.targets)
    step_grad = torch.autograd.grad((expected * losses).sum(), list(model.parameters()))
    buf = {k: optimizer.state[p]["momentum_buffer"].clone() for k, p in model.named_parameters()}

    stepper = MetaStep(model, optimizer, objective, method, adam_preconditioner="fixed")
    out = stepper.step([train], meta)
    index, weights = out.sample_weights()
    assert torch.equal(index, torch.arange(8)) and (weights >= 0).all() and (expected == 0).any()
    torch.testing.assert_close(weights.double(), expected.float().double(), rtol=1e-5, atol=1e-7)
    assert stepper.meta_optimizer is None and stepper.global_step == 1 and stepper.meta_steps == 1
    for (name, p), g_ in zip(model.named_parameters(), step_grad):  # SGD with momentum 0.9, weight decay 1e-2
        d = g_ + 1e-2 * theta0[name]
        new_buf = 0.9 * buf[name] + d
        torch.testing.assert_close(p.detach(), theta0[name] - 0.2 * new_buf, rtol=1e-9, atol=1e-12)


def test_all_non_positive_gradients_give_zero_weights_and_plain_steps_the_mean():
    objective = LearningToReweight()
    b = Batch(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
    (eps,) = objective.init_batch_variables(b)
    (w,) = objective.update_batch_variables(b, [eps], [torch.tensor([0.0, 1.0, 2.0, 0.5])])
    assert torch.equal(w, torch.zeros(4))
    wt = objective.inner_terms(torch.nn.Linear(5, 3), b)
    assert torch.allclose(wt.weights, torch.full((4, 1), 0.25))
    with pytest.raises(ValueError, match="no meta-parameters"):
        objective.make_meta_optimizer()
    model = torch.nn.Linear(5, 3)
    lookahead = MetaStep(model, torch.optim.SGD(model.parameters(), lr=0.1), objective, real_step="lookahead")
    with pytest.raises(ValueError, match="per-batch meta variables.*use real_step='recompute'"):
        lookahead.step(b, b)
    assert lookahead.global_step == 0 and lookahead.meta_steps == 0


def test_trainer_runs_l2rw_with_plain_steps_between_meta_steps():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    ds = TensorIndexedDataset(x, y)
    model = torch.nn.Linear(5, 3)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=16),
                          LearningToReweight(), meta_loader=DataLoader(ds, batch_size=16), meta_interval=2,
                          progress=False)
    history = trainer.fit(epochs=2)
    assert trainer.global_step == 8 and trainer.meta_steps == 4 and len(trainer.weights_history) == 128
    assert all(k in history[-1] for k in ("train_loss", "meta_loss"))
