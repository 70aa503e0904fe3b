"""Mixed precision, gradient accumulation, clipping and schedulers: the optimizer-step concerns of MetaTrainer."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset, Unrolled
from metareweight.data import as_batch
from metareweight.precision import Precision

BF16_TOLERANCE = 2e-2  # relative L2 error, documented in metareweight/precision.py (measured 0.3-0.9 %)


def _trainer(seed=0, n=64, batch=16, model=None, **kw):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ds = TensorIndexedDataset(x, y)
    model = model or nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.5)
    return MetaTrainer(model, opt, DataLoader(ds, batch_size=batch), MetaWeightNet(hidden=16),
                       meta_loader=DataLoader(ds, batch_size=batch), progress=False, **kw)


def _flat(grads):
    return torch.cat([g.reshape(-1).double() for g in grads])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_hypergradient_matches_float32(seed):
    trainer = _trainer(seed)
    batches = [as_batch(b) for b in trainer.train_loader]
    problem = lambda: trainer.build_problem(batches[:1], batches[1])  # noqa: E731
    exact = _flat(Unrolled()(problem()).grads)
    trainer.precision = Precision("bf16", torch.device("cpu"))  # the model's forward passes run in bf16
    low = _flat(Unrolled()(problem()).grads)
    rel = float((low - exact).norm() / exact.norm())
    cos = float(torch.nn.functional.cosine_similarity(low, exact, dim=0))
    print(f"seed {seed}: bf16 hypergradient relative error {rel:.2e}, cosine {cos:.5f}")
    assert 0 < rel < BF16_TOLERANCE and cos > 0.9998


def test_bf16_training_runs_and_keeps_float32_state():
    trainer = _trainer(precision="bf16")
    history = trainer.fit(epochs=2)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert history[-1]["train_loss"] < history[0]["train_loss"] + 0.5 and trainer.meta_steps == 8
    assert 0 < trainer.evaluate(trainer.train_loader)["accuracy"] <= 1


def test_fp16_needs_a_gpu_and_unknown_precisions_are_named():
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device"):
        Precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        _trainer(precision="half")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs CUDA (none on this machine)")
def test_fp16_trains_on_gpu():  # pragma: no cover - runs only where a GPU is present
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)).cuda()
    trainer = _trainer(model=model, precision="fp16")
    trainer.objective.cuda()
    trainer.fit(epochs=1)
    assert trainer.precision.scaler.get_scale() > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_accumulation_averages_two_micro_steps_of_both_optimizers():
    """accumulate 2 + meta-accumulate 2: θ and φ each take one step on the mean of two micro-batch gradients,
    computed at the same (θ0, φ0)."""
    trainer = _trainer(accumulate_steps=2, meta_accumulate_steps=2)
    trainer.meta_optimizer = torch.optim.SGD(trainer.objective.parameters(), lr=0.1)
    ref = copy.deepcopy(trainer)  # (θ0, φ0)
    batches = [as_batch(b) for b in ref.train_loader][:2]
    hyper = [Unrolled()(ref.build_problem([b], m)).grads for b, m in zip(batches, batches)]

    def grad(b):
        return torch.autograd.grad(ref.objective.inner_terms(ref.model, b).loss(), list(ref.model.parameters()))

    grads = [grad(batches[0])]
    with torch.no_grad():  # φ steps when its window is full, before the second real step re-weights its batch
        for q, h1, h2 in zip(ref.objective.meta_parameters(), *hyper):
            q.sub_(0.1 * (h1 + h2) / 2)
    grads.append(grad(batches[1]))
    phi1 = [q.detach().clone() for q in ref.objective.meta_parameters()]
    trainer.fit(epochs=1, max_steps=2)
    assert trainer.global_step == 2 and trainer.meta_steps == 2
    for p, p0, g1, g2 in zip(trainer.model.parameters(), ref.model.parameters(), *grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.5 * (g1 + g2) / 2, rtol=0, atol=1e-7)
    for q, q1 in zip(trainer.objective.meta_parameters(), phi1):
        torch.testing.assert_close(q.detach(), q1, rtol=0, atol=1e-7)


def test_clipping_bounds_the_real_and_the_meta_step():
    trainer = _trainer(grad_clip=1e-3, meta_grad_clip=1e-4)
    trainer.optimizer.param_groups[0]["lr"] = 1.0
    trainer.meta_optimizer = torch.optim.SGD(trainer.objective.parameters(), lr=1.0)
    theta0 = _flat([p.detach().clone() for p in trainer.model.parameters()])
    phi0 = _flat([p.detach().clone() for p in trainer.objective.meta_parameters()])
    trainer.fit(epochs=1, max_steps=1)
    with torch.no_grad():
        step = (_flat(list(trainer.model.parameters())) - theta0).norm()
        meta_step = (_flat(trainer.objective.meta_parameters()) - phi0).norm()
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6): the step lands within 1e-3 relative of the bound
    assert float(step) == pytest.approx(1e-3, rel=1e-3) and float(meta_step) == pytest.approx(1e-4, rel=1e-3)


def test_per_step_schedulers_also_step_for_a_partial_window_at_the_end_of_an_epoch():
    # 4 steps an epoch, windows of 3: a full window and a flushed partial one each epoch, for both optimizers
    opt_holder = {}

    def make(**kw):
        model = nn.Linear(8, 3)
        opt_holder["opt"] = torch.optim.SGD(model.parameters(), lr=1.0)
        return _trainer(model=model, optimizer=opt_holder["opt"], accumulate_steps=3, meta_accumulate_steps=3,
                        scheduler_interval="step", **kw)

    trainer = make()
    opt = opt_holder["opt"]
    trainer.scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    trainer.meta_scheduler = torch.optim.lr_scheduler.StepLR(trainer.meta_optimizer, 1, gamma=0.5)
    meta_lr = trainer.meta_optimizer.param_groups[0]["lr"]
    trainer.fit(epochs=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 ** 4)
    assert trainer.meta_optimizer.param_groups[0]["lr"] == pytest.approx(meta_lr * 0.5 ** 4)


def test_schedulers_step_per_epoch_and_virtual_steps_follow_the_learning_rate():
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    trainer = _trainer(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    trainer.meta_scheduler = torch.optim.lr_scheduler.StepLR(trainer.meta_optimizer, 1, gamma=0.1)
    trainer.fit(epochs=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert [h.lr for h in trainer.functional_optimizer.hypers.values()] == pytest.approx([0.1, 0.1])
    assert trainer.meta_optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="accumulate_steps > 1 needs real_step='recompute'"):
        _trainer(accumulate_steps=2, real_step="lookahead")
    with pytest.raises(ValueError, match="scheduler_interval must be one of"):
        _trainer(scheduler_interval="batch")
