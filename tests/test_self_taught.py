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
    (True, 1, {"preset": "original", "detach_features": False}),  # memories, whole-batch BN, N(0, 0.02) init
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


# ---- presets, initialisation and the statistics memory (issue 22) --------------------------------------------------
def test_presets_set_their_options_and_explicit_arguments_win():
    lib, orig = SelfTaughtRescaler(2), SelfTaughtRescaler(2, preset="original")
    assert (lib.preset, lib.bn_scope, lib.stats_window, lib.init, lib.detach_features,
            lib.restart_inner_optimizer) == ("library", "class", 0, "torch", False, False)
    assert (orig.preset, orig.bn_scope, orig.stats_window, orig.init, orig.detach_features,
            orig.restart_inner_optimizer) == ("original", "batch", 1, "original", True, True)
    assert lib.memories == {} and sorted(orig.memories) == ["meta", "train"]
    assert orig.memories["train"] is not orig.memories["meta"] and orig.memories["train"].window == 1
    assert lib.trainer_callbacks() == [] and isinstance(orig.trainer_callbacks()[0], ResetOptimizerState)
    mixed = SelfTaughtRescaler(2, preset="original", bn_scope="class", stats_window=0, init="torch",
                               detach_features=False, restart_inner_optimizer=False)
    assert (mixed.bn_scope, mixed.stats_window, mixed.init, mixed.detach_features, mixed.trainer_callbacks(),
            mixed.memories) == ("class", 0, "torch", False, [], {})
    assert SelfTaughtRescaler(2, stats_window=2).memories["meta"].window == 2  # the library preset with a memory


@pytest.mark.parametrize("kw,msg", [({"preset": "paper"}, "preset must be one of"),
                                    ({"stats_window": -1}, "stats_window"), ({"stats_window": 1.5}, "stats_window"),
                                    ({"init": "xavier"}, "init must be one of")])
def test_bad_preset_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SelfTaughtRescaler(2, **kw)


def test_original_initialisation_is_normal_002_with_zero_biases():
    torch.manual_seed(0)
    lin = [m for m in SelfTaughtRescaler(3, preset="original", features="full").modules() if isinstance(m, nn.Linear)]
    w = torch.cat([m.weight.detach().reshape(-1) for m in lin])
    assert len(lin) == 6 and all(not m.bias.any() for m in lin)
    assert float(w.std()) == pytest.approx(0.02, rel=0.1) and abs(float(w.mean())) < 0.003
    torch.manual_seed(0)
    default = torch.cat([m.weight.detach().reshape(-1) for m in SelfTaughtRescaler(3).modules() if isinstance(m, nn.Linear)])
    assert float(default.std()) > 5 * float(w.std())  # PyTorch's default for 19 inputs: about 6.6x larger


def test_detached_features_leave_only_the_direct_path_to_the_model():
    torch.manual_seed(0)
    model = _model()
    batch = Batch(torch.randn(12, 6), torch.arange(12) % 3)
    for detach, expect in ((True, 0.0), (False, None)):
        obj = SelfTaughtRescaler(3, detach_features=detach)
        torch.manual_seed(1)
        w = obj.inner_terms(model, batch).weights
        g = torch.autograd.grad(w.sum(), list(model.parameters()), allow_unused=True)
        total = sum(float(x.abs().sum()) for x in g if x is not None)
        assert (total == 0.0) if expect == 0.0 else (total > 0)


def _memory_reference(chunks, window):
    """Port of the original ``Filter`` (window in batches of B) for the features of the last chunk: per class the
    last window·B samples of that class over all chunks, then ``_reference_features``' group statistics."""
    B = len(chunks[-1][2])
    per = [np.concatenate([c[k] for c in chunks]) for k in range(5)]  # mu_l, sd_l, mu_p, sd_p, agree
    y_all = np.concatenate([c[5] for c in chunks])
    owner = np.concatenate([np.full(len(c[5]), i) for i, c in enumerate(chunks)])
    keep = np.zeros(len(y_all), bool)
    for c in np.unique(y_all):
        keep[np.nonzero(y_all == c)[0][-window * B:]] = True
    mu_l, sd_l, mu_p, sd_p, agree = per

    def kl(pm, ps, qm, qs):
        return 0.0 if ps == 0 or qs == 0 else math.log(qs / ps) + (ps ** 2 + (pm - qm) ** 2) / (2 * qs ** 2) - 0.5

    def gstats(x, members):
        v = np.asarray([x[j] for j in members])
        return v.mean(), (v.std(ddof=1) if len(v) > 1 else 1e-8)

    mem = np.nonzero(keep)[0]
    group = {i: [j for j in mem if y_all[j] == y_all[i] and agree[j] == agree[i]] for i in mem}
    kls, ovls = np.zeros(len(y_all)), np.zeros(len(y_all))
    for i in mem:
        gm_mu, gm_sd = gstats(mu_l, group[i])[0], gstats(sd_l, group[i])[0]
        kls[i] = kl(mu_l[i], sd_l[i], gm_mu, gm_sd)
        ovls[i] = NormalDist(mu_l[i], max(sd_l[i], 1e-8)).overlap(NormalDist(gm_mu, max(gm_sd, 1e-8)))
    rows = []
    for i in np.nonzero(owner == len(chunks) - 1)[0]:
        row = []
        for x in (mu_l, sd_l, mu_p, sd_p, kls, ovls):
            row += [x[i], *gstats(x, group[i])]
        rows.append(row + [float(agree[i])])
    return np.asarray(rows)


@pytest.mark.parametrize("window", [1, 2])
def test_statistics_memory_spans_batches_like_the_original_filter(window):
    from metareweight.objectives.self_taught_features import StatsMemory, sample_stats
    torch.manual_seed(window)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 2)).double()
    mem, chunks = StatsMemory(window), []
    for step in range(4):  # B = 12, two classes: with window 1 a class's memory reaches into the previous batch
        x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 2, (12,))
        losses, logits = dropout_passes(model, x, y, passes=3)
        ours = storm_features(losses, logits, y, memory=mem, key=step).detach().numpy()
        st = {k: v.detach().numpy() for k, v in sample_stats(losses, logits, y).items()}
        chunks.append([st["mu_l"], st["sd_l"], st["mu_p"], st["sd_p"], st["agree"], st["label"]])
        np.testing.assert_allclose(ours, _memory_reference(chunks, window), rtol=1e-9, atol=1e-12)
    assert len(mem) == sum(min(window * 12, sum((c[5] == k).sum() for c in chunks)) for k in (0, 1))
    # ... and differs from the current batch alone
    assert not np.allclose(ours, storm_features(losses, logits, y).detach().numpy())
    # the same batch again replaces itself instead of being counted twice
    again = storm_features(losses, logits, y, memory=mem, key=3).detach().numpy()
    np.testing.assert_allclose(again, ours, rtol=1e-12)


def test_train_and_meta_batches_keep_separate_memories_and_epoch_end_empties_them():
    torch.manual_seed(0)
    obj = SelfTaughtRescaler(3, preset="original")
    model = _model()
    train = Batch(torch.randn(12, 6), torch.arange(12) % 3, index=torch.arange(12))
    meta = Batch(torch.randn(12, 6), torch.arange(12) % 3, index=torch.arange(12, 24))
    obj.inner_terms(model, train)
    assert (len(obj.memories["train"]), len(obj.memories["meta"])) == (12, 0)
    obj.outer_loss(model, meta)
    obj.outer_loss(model, meta)  # a repeated evaluation of the same meta batch is not counted twice
    assert (len(obj.memories["train"]), len(obj.memories["meta"])) == (12, 12)
    obj.on_epoch_end(None, 0)
    assert (len(obj.memories["train"]), len(obj.memories["meta"])) == (0, 0)


def test_trainer_with_the_original_preset_fills_and_empties_the_memory_each_epoch():
    from metareweight.callbacks import Callback

    class Watch(Callback):
        sizes = []

        def on_step_end(self, trainer, metrics):
            self.sizes.append(len(obj.memories["train"]))

        def on_epoch_end(self, trainer, metrics):
            self.sizes.append(("end", len(obj.memories["train"]), len(obj.memories["meta"])))

    torch.manual_seed(0)
    obj, model = SelfTaughtRescaler(3, preset="original"), _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = MetaTrainer(model, opt, _noisy_loader(), objective=obj, real_step="lookahead", progress=False,
                          callbacks=[*obj.trainer_callbacks(), Watch()])
    hist = trainer.fit(epochs=2)
    sizes = Watch.sizes
    # 4 steps of 16 samples per epoch: the memory grows past one batch within the epoch, is empty at its end
    assert sizes[0] == 16 and sizes[0] < sizes[1] < sizes[2] <= sizes[3] <= 3 * 16, sizes
    assert sizes[4] == ("end", 0, 0) and sizes[9] == ("end", 0, 0)
    assert len(opt.state) == 0 and all(np.isfinite(h["meta_loss"]) for h in hist)
