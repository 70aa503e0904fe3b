"""The self-taught rescaler (STORM): features against a loop re-implementation of the original code, the
hypergradient against a float64 finite difference of the true bilevel objective, ablation switches and errors."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bilevel_fixtures import batches, central_difference, dot, random_direction
from metareweight import MetaTrainer, TensorIndexedDataset, Unrolled
from metareweight.core import BilevelProblem, FunctionalOptimizer
from metareweight.data import Batch
from metareweight.losses import cross_entropy_terms
from metareweight.objectives.self_taught import ResetOptimizerState, SelfTaughtRescaler
from metareweight.objectives.self_taught_features import (FEATURE_NAMES, agreement, dropout_passes, gaussian_kl,
                                                          normal_overlap, storm_features)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- features ------------------------------------------------------------------------------------------------
def _reference_features(losses, logits, y):
    """Sample-by-sample port of the original ``Results``/``Filter`` code (stats_window=1, class separation on)."""
    G, B = losses.shape
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True)).max(-1)
    preds = logits.argmax(-1)
    cnt = (preds == y).sum(0)
    agree = cnt >= G / 2
    tie = cnt == G / 2
    agree[tie] = (preds[0] == y)[tie]
    std = (lambda a: a.std(0, ddof=1)) if G > 1 else (lambda a: np.zeros(a.shape[1]))
    mu_l, sd_l, mu_p, sd_p = losses.mean(0), std(losses), probs.mean(0), std(probs)

    def kl(pm, ps, qm, qs):
        return 0.0 if ps == 0 or qs == 0 else math.log(qs / ps) + (ps ** 2 + (pm - qm) ** 2) / (2 * qs ** 2) - 0.5

    def gstats(x, members):
        v = np.asarray([x[j] for j in members])
        return v.mean(), (v.std(ddof=1) if len(v) > 1 else 1e-8)

    out = np.zeros((B, 19))
    groups = [[j for j in range(B) if y[j] == y[i] and agree[j] == agree[i]] for i in range(B)]
    kls, ovls = np.zeros(B), np.zeros(B)
    for i in range(B):
        gm_mu, gm_sd = gstats(mu_l, groups[i])[0], gstats(sd_l, groups[i])[0]
        kls[i] = kl(mu_l[i], sd_l[i], gm_mu, gm_sd)
        ovls[i] = NormalDist(mu_l[i], max(sd_l[i], 1e-8)).overlap(NormalDist(gm_mu, max(gm_sd, 1e-8)))
    for i in range(B):
        row = []
        for x in (mu_l, sd_l, mu_p, sd_p, kls, ovls):
            row += [x[i], *gstats(x, groups[i])]
        out[i] = row + [float(agree[i])]
    return out


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_features_match_a_port_of_the_original_code(passes):
    torch.manual_seed(passes)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    losses, logits = (dropout_passes(model, x, y, passes=passes) if passes > 1
                      else (cross_entropy_terms(model(x), y)[None], model(x)[None]))
    ours = storm_features(losses, logits, y).detach().numpy()
    ref = _reference_features(losses.detach().numpy(), logits.detach().numpy(), y.numpy())
    assert ours.shape == (20, len(FEATURE_NAMES))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_gaussian_helpers_and_agreement_ties():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(50, 2, generator=g, dtype=torch.float64)
    sd = torch.rand(50, 2, generator=g, dtype=torch.float64) + 0.05
    sd[:5, 1] = sd[:5, 0]  # equal variances take the other branch
    ovl = normal_overlap(mu[:, 0], sd[:, 0], mu[:, 1], sd[:, 1])
    ref = [NormalDist(a, b).overlap(NormalDist(c, d)) for a, c, b, d in zip(*mu.T.tolist(), *sd.T.tolist())]
    np.testing.assert_allclose(ovl.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert float(gaussian_kl(*torch.tensor([0.3, 0.0, 0.1, 1.0]))) == 0.0  # zero std -> 0, as the original
    # passes: two of three predict the label -> agree; 1 of 2 (a tie) -> pass 0 decides
    logits = torch.tensor([[[2., 0.]], [[0., 2.]], [[2., 0.]]])
    assert agreement(logits, torch.tensor([0])).tolist() == [True]
    assert agreement(logits[1:], torch.tensor([0])).tolist() == [False]
    assert agreement(logits[:2], torch.tensor([0])).tolist() == [True]


# ---- the hypergradient against the true bilevel objective -------------------------------------------------------
def _seeded(fn, seed):
    """Fix the dropout masks of each evaluation, so the bilevel objective is a deterministic function of φ."""

    def call(forward, batch):
        torch.manual_seed(seed)
        return fn(forward, batch)

    return call


def _problem(dropout=True, unroll=1, **kw):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 7), nn.Tanh()] + ([nn.Dropout(0.3)] if dropout else []) + [nn.Linear(7, 3)]
    model = nn.Sequential(*layers).double()
    obj = SelfTaughtRescaler(3, passes=3 if dropout else 1, **kw).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for b in batches("mlp", 16, 2, 100):  # non-trivial Adam state
        opt.zero_grad()
        cross_entropy_terms(model(b.inputs), b.targets).mean().backward()
        opt.step()
    fopt = FunctionalOptimizer.from_torch(opt, model)
    problem = BilevelProblem(
        model=model, params={k: v.detach() for k, v in model.named_parameters()}, buffers={}, optimizer=fopt,
        opt_state=fopt.read_state(), meta_params=obj.meta_parameters(), inner=_seeded(obj.inner_terms, 11),
        outer=_seeded(obj.outer_loss, 12), train_batches=batches("mlp", 16, unroll, 1),
        meta_batch=batches("mlp", 16, 1, 2)[0])
    return problem, obj


@pytest.mark.parametrize("dropout,unroll,kw", [
    (True, 1, {}),                                     # G=3 dropout passes, RNG seeded before each evaluation
    (False, 1, {}),                                    # G=1, no dropout: deterministic as is
    (True, 2, {}),                                     # two unrolled steps: φ → θ_1 → features → weights of step 2
    (True, 1, {"bn_scope": "batch"}),
    (True, 1, {"class_separation": False, "features": "loss"}),
    (True, 1, {"meta_loss_rescaling": False}),
])
def test_hypergradient_matches_float64_finite_difference(dropout, unroll, kw):
    problem, _ = _problem(dropout, unroll, **kw)
    grads = Unrolled()(problem).grads
    for seed in (1,):
        d = random_direction(problem, seed)
        # h = 1e-6: the rescaler's ReLUs put kinks within 1e-5 of some points (the FD error there is ~3e-3)
        assert dot(grads, d) == pytest.approx(central_difference(problem, d, h=1e-6), rel=1e-6, abs=1e-10)


def test_hypergradient_has_both_a_second_order_and_a_direct_part():
    problem, _ = _problem()
    result = Unrolled()(problem)
    theta = {k: v.detach() for k, v in result.lookahead[0].items()}
    direct = problem.meta_grads(problem.outer_loss(theta))  # ∂L_out/∂ω at fixed θ'
    second = [g - d for g, d in zip(result.grads, direct)]
    norm = lambda gs: math.sqrt(dot(gs, gs))  # noqa: E731
    assert norm(direct) > 0.05 * norm(result.grads) and norm(second) > 0.05 * norm(result.grads)
    # without meta loss rescaling there is no direct part
    problem, _ = _problem(meta_loss_rescaling=False)
    result = Unrolled()(problem)
    theta = {k: v.detach() for k, v in result.lookahead[0].items()}
    assert not problem.outer_loss(theta).requires_grad


# ---- switches and the trainer ---------------------------------------------------------------------------------
def _noisy_loader(n=64, classes=3, seed=0, batch_size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :classes]).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.3
    y = torch.where(noisy, (y + 1) % classes, y)
    return DataLoader(TensorIndexedDataset(x, y, noisy=noisy), batch_size=batch_size, shuffle=True,
                      generator=g, drop_last=True)


def _model():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def test_trainer_runs_storm_with_lookahead_and_keeps_optimizer_state():
    torch.manual_seed(0)
    model, obj = _model(), SelfTaughtRescaler(3, singleton="neutral")
    before = [p.detach().clone() for p in obj.meta_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = MetaTrainer(model, opt, _noisy_loader(), objective=obj, real_step="lookahead", progress=False)
    hist = trainer.fit(epochs=1)
    assert trainer.meta_steps == 4 and "weight_auroc" in hist[-1]
    assert any(not torch.equal(a, b) for a, b in zip(before, obj.meta_parameters()))
    assert float(next(iter(opt.state.values()))["step"]) == 4  # the state survives across steps


def test_reset_optimizer_state_reproduces_the_original_adam_quirk():
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = MetaTrainer(model, opt, _noisy_loader(), objective=SelfTaughtRescaler(3, singleton="neutral"), real_step="lookahead",
                          callbacks=[ResetOptimizerState()], adam_preconditioner="fixed", progress=False)
    trainer.fit(epochs=1)
    assert len(opt.state) == 0


def test_without_meta_learning_the_rescaler_stays_at_init():
    torch.manual_seed(0)
    obj = SelfTaughtRescaler(3, meta_learning=False, singleton="neutral")
    before = [p.detach().clone() for p in obj.parameters()]
    model = _model()
    trainer = MetaTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), _noisy_loader(), objective=obj,
                          real_step="lookahead", progress=False)
    trainer.fit(epochs=1)
    assert obj.meta_parameters() == [] and trainer.global_step == 4 and len(trainer.weights_history) == 64
    assert all(torch.equal(a, b) for a, b in zip(before, obj.parameters()))


def test_clean_validation_variant_uses_the_meta_loader():
    obj = SelfTaughtRescaler(3, meta_data="loader", meta_loss_rescaling=False)
    model = _model()
    with pytest.raises(ValueError, match="needs a meta_loader"):
        MetaTrainer(model, torch.optim.Adam(model.parameters()), _noisy_loader(), objective=obj, progress=False)


# ---- errors ---------------------------------------------------------------------------------------------------
def test_class_with_one_sample_names_the_class_and_the_fixes():
    batch = Batch(torch.randn(5, 6), torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"class 2 has 1 sample in this batch of 5.*larger batch.*class_separation"):
        SelfTaughtRescaler(3).inner_terms(_model(), batch)
    w = SelfTaughtRescaler(3, singleton="neutral").inner_terms(_model(), batch).weights
    assert float(w[4].detach()) == 0.5 and not torch.equal(w[:4], torch.full_like(w[:4], 0.5))


def test_batch_of_one_is_an_error():
    with pytest.raises(ValueError, match="at least 2 samples.*drop_last"):
        SelfTaughtRescaler(3).inner_terms(_model(), Batch(torch.randn(1, 6), torch.tensor([0])))


def test_model_without_dropout_is_an_error_unless_input_dropout():
    model = nn.Linear(6, 3)
    batch = Batch(torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="identical outputs.*no active dropout.*input_dropout"):
        SelfTaughtRescaler(3).inner_terms(model, batch)
    wt = SelfTaughtRescaler(3, input_dropout=0.2).inner_terms(model, batch)
    assert wt.weights.shape == (8, 1)
    # passes=1 needs no dropout (the std features are then 0)
    assert SelfTaughtRescaler(3, passes=1).inner_terms(model, batch).terms.shape == (8, 1)


@pytest.mark.parametrize("kw,msg", [
    ({"num_classes": 1}, "num_classes"), ({"passes": 0}, "passes"), ({"features": "all"}, "feature set"),
    ({"bn_scope": "group"}, "bn_scope"), ({"meta_data": "val"}, "meta_data"), ({"singleton": "x"}, "singleton"),
])
def test_bad_options(kw, msg):
    args = {"num_classes": 3, **kw}
    with pytest.raises(ValueError, match=msg):
        SelfTaughtRescaler(**args)


def test_wrong_number_of_classes():
    with pytest.raises(ValueError, match="outputs 3 classes but the rescaler was built for num_classes=2"):
        SelfTaughtRescaler(2).inner_terms(_model(), Batch(torch.randn(4, 6), torch.tensor([0, 1, 0, 1])))
