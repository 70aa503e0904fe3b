"""Domain weights (DreamPRM): the objective's semantics, its errors, its hypergradients, and the experiment."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bilevel_fixtures import central_difference, dot, random_direction
from metareweight import FiniteDifference, MetaTrainer, TensorIndexedDataset, Unrolled
from metareweight.core import BilevelProblem, FunctionalOptimizer
from metareweight.data import Batch
from metareweight.data import prm
from metareweight.objectives.domain_weights import DomainWeights, StepAggregationLoss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _batch(domains, d_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(domains)
    return Batch(torch.randn(n, d_in, generator=g), torch.rand(n, generator=g), torch.arange(n),
                 {"domain": torch.tensor(domains)})


def test_weights_average_one_over_all_domains_whatever_the_batch_holds():
    obj = DomainWeights(4)
    with torch.no_grad():
        obj.raw.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    alpha = obj.domain_weights()
    assert float(alpha.detach().mean()) == pytest.approx(1.0, abs=1e-6)
    model = torch.nn.Linear(4, 1)
    wt = obj.inner_terms(model, _batch([2, 2, 2]))           # a batch holding one domain only
    torch.testing.assert_close(wt.weights.squeeze(1), alpha[2].detach().expand(3) / 3)
    torch.testing.assert_close(wt.sample_weights(), alpha[2].detach().expand(3))
    sp = torch.nn.functional.softplus(obj.raw.detach())
    torch.testing.assert_close(alpha.detach(), sp / sp.mean())


def test_step_aggregation_is_sigmoid_of_mean_log_odds_over_real_prefixes():
    v = torch.tensor([[0.9, 0.6, 0.2], [0.3, 0.5, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    batch = Batch(v.unsqueeze(-1), torch.tensor([1.0, 0.0], dtype=torch.float64), extras={"step_mask": mask})
    prob_model = lambda x: x                                   # noqa: E731  the "PRM" outputs V itself
    logit_model = lambda x: torch.log(x / (1 - x))             # noqa: E731  ... or its log-odds
    lo = torch.log(v / (1 - v))
    want = torch.sigmoid(torch.stack([lo[0, :2].mean(), lo[1].mean()]))
    torch.testing.assert_close(StepAggregationLoss(output="probability").scores(prob_model, batch), want)
    torch.testing.assert_close(StepAggregationLoss().scores(logit_model, batch), want)
    loss = StepAggregationLoss()(logit_model, batch)
    assert float(loss) == pytest.approx(float(((want - batch.targets) ** 2).mean()))


def test_bad_domain_ids_are_clear_errors():
    obj, model = DomainWeights(3), torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match="domain id 3 is out of range.*num_domains=3"):
        obj.inner_terms(model, _batch([0, 3]))
    with pytest.raises(ValueError, match="domain id -1 is out of range"):
        obj.inner_terms(model, _batch([0, -1]))
    with pytest.raises(ValueError, match="needs a 'domain' id per sample"):
        obj.inner_terms(model, Batch(torch.zeros(2, 4), torch.zeros(2)))
    with pytest.raises(ValueError, match="unknown aggregation"):
        DomainWeights(3, aggregation="mean")
    with pytest.raises(ValueError, match="num_domains must be a positive integer"):
        DomainWeights(0)


def test_a_declared_domain_that_never_appears_fails_after_the_first_epoch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.rand(32)
    ds = TensorIndexedDataset(x, y, domain=torch.tensor([0, 1] * 16))  # domain 2 declared, never present
    meta = TensorIndexedDataset(torch.randn(8, 2, 4), torch.ones(8), step_mask=torch.ones(8, 2, dtype=torch.bool))
    model = torch.nn.Linear(4, 1)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=8),
                          objective=DomainWeights(3, names=["a", "b", "c"]), meta_loader=DataLoader(meta, batch_size=4),
                          progress=False, **DomainWeights.trainer_options(unroll_steps=2))
    with pytest.raises(ValueError, match=r"domain\(s\) \['c'\] never appeared"):
        trainer.fit(epochs=1)


def _step_kinds(sols):
    """Masks of the steps that follow the target rule (``± a``) and the shifted sibling's rule (``± (a + 1)``)."""
    prev = np.concatenate([sols.start[:, None], sols.claimed[:, :-1]], 1)
    change, real = sols.claimed - prev, prm.step_mask(sols)
    return (change == sols.sign * sols.operand) & real, (change == sols.sign * (sols.operand + 1)) & real, real


def test_shifted_solver_habit_writes_target_rule_steps_that_its_own_labels_mark_wrong():
    """The shifted domain's conflict with the target task: with ``habit`` 0.3 about 30 % of its steps are correct
    under the target rule, and its Monte-Carlo labels (from its own rule) score them far below its own correct steps."""
    rng = np.random.default_rng(0)
    sols = prm.sample_solutions(rng, 1000, offset=1, habit=0.3)
    labels = prm.mc_labels(rng, sols, 16, 0.03)
    target_ok, own_ok, real = _step_kinds(sols)
    assert 0.25 < target_ok.sum() / real.sum() < 0.35
    assert labels[target_ok].mean() < 0.25 and labels[own_ok].mean() > 0.4
    no_habit, _, real0 = _step_kinds(prm.sample_solutions(rng, 1000, offset=1))
    assert no_habit.sum() / real0.sum() < 0.03
    assert prm.prm_domains()["shifted"] == prm.PRM_DOMAINS["shifted"] == (0.25, {"offset": 1})


# ---- hypergradients on a small float64 PRM problem ------------------------------------------------------------------
def _prm_problem(unroll: int, lr: float = 0.5, seed: int = 0, aggregation: str = "step_mse", adam_warm_steps=None):
    """``adam_warm_steps``: use Adam (lr 1e-3, fixed preconditioner) warmed by that many real steps, as in training;
    ``None``: plain SGD with ``lr``."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    k = 4
    feats, labels, _ = prm.prefix_examples(rng, prm.sample_solutions(rng, 40), completions=8)
    x, y = torch.from_numpy(feats).double(), torch.from_numpy(labels).double()
    dom = torch.from_numpy(rng.integers(0, k, size=len(y)))
    model = torch.nn.Sequential(torch.nn.Linear(prm.feature_dim(), 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    obj = DomainWeights(k, loss="mse", aggregation=aggregation).double()
    with torch.no_grad():
        obj.raw.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64))
    batches = [Batch(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16], extras={"domain": dom[i * 16:(i + 1) * 16]})
               for i in range(unroll)]
    meta_sols = prm.sample_solutions(rng, 12)
    meta = Batch(torch.from_numpy(prm.prefix_features(meta_sols)).double(),
                 torch.from_numpy(meta_sols.correct().astype(np.float64)),
                 extras={"step_mask": torch.from_numpy(prm.step_mask(meta_sols))})
    if adam_warm_steps is None:
        opt, preconditioner = torch.optim.SGD(model.parameters(), lr=lr), "differentiable"
    else:
        opt, preconditioner = torch.optim.Adam(model.parameters(), lr=1e-3), "fixed"
        for _ in range(adam_warm_steps):
            idx = torch.from_numpy(rng.integers(0, len(y), 16))
            opt.zero_grad()
            obj.inner_terms(model, Batch(x[idx], y[idx], extras={"domain": dom[idx]})).loss().backward()
            opt.step()
    return BilevelProblem.from_model(model, opt, obj, batches, meta, preconditioner)


def _cosine(a, b):
    return dot(a, b) / (dot(a, a) ** 0.5 * dot(b, b) ** 0.5)


@pytest.mark.parametrize("unroll", [1, 5])
def test_exact_hypergradient_matches_float64_finite_difference_of_the_bilevel_objective(unroll):
    problem = _prm_problem(unroll)
    grads = Unrolled()(problem).grads
    assert dot(grads, grads) > 1e-12
    for seed in (1, 2):
        d = random_direction(problem, seed)
        assert dot(grads, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("unroll", [1, 5])
def test_darts_finite_difference_agrees_in_direction_with_the_exact_hypergradient(unroll):
    problem = _prm_problem(unroll)
    exact = Unrolled()(problem).grads
    approx = FiniteDifference(alpha=0.01)(problem).grads
    cos = _cosine(exact, approx)
    assert cos > (0.999 if unroll == 1 else 0.9), cos


@pytest.mark.parametrize("seed", range(4))
def test_optimizer_scaled_darts_is_the_exact_one_step_hypergradient_under_adam(seed):
    problem = _prm_problem(1, seed=seed, adam_warm_steps=20)
    exact = Unrolled()(problem).grads
    assert _cosine(exact, FiniteDifference(alpha=0.01)(problem).grads) > 0.9999


@pytest.mark.xfail(strict=True, reason="measured after the per-step-state fix (FiniteDifference used an empty Adam "
                   "state for steps 2..5 before): cosine with the exact hypergradient 0.995, 0.978, -0.439, 1.000 on "
                   "seeds 0-3 (0.94-0.996 on seeds 4-7), norm 0.2-0.5x the exact one: the truncated finite difference "
                   "ignores each gradient's carry-over through Adam's momentum into later steps, and on seed 2 that "
                   "flips the direction (FiniteDifference(optimizer_carry=True) keeps it: the carry tests below)")
def test_optimizer_scaled_darts_agrees_with_the_exact_hypergradient_under_adam_over_five_steps():
    for seed in range(4):
        problem = _prm_problem(5, seed=seed, adam_warm_steps=20)
        assert _cosine(Unrolled()(problem).grads, FiniteDifference(alpha=0.01)(problem).grads) > 0.9, seed


def _linear_inner_problem(opt_name: str, unroll: int = 5, seed: int = 0):
    """Domain weights on a linear model whose inner loss terms (minus the label's logit) are linear in θ, so the
    loss Hessian is zero and only the optimizer's own dynamics couple the steps; the outer loss is cross-entropy."""
    from bilevel_fixtures import OPTS

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3).double()
    obj = DomainWeights(3, loss=lambda out, y: -out.gather(1, y[:, None]).squeeze(1), aggregation="cross_entropy")
    obj = obj.double()
    with torch.no_grad():
        obj.raw.copy_(torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64))
    cls, kw = OPTS[opt_name]
    opt = cls(model.parameters(), **kw)

    def batch(n=12):
        return Batch(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,)),
                     extras={"domain": torch.randint(0, 3, (n,))})

    for _ in range(3):  # warm the optimizer state (momentum buffers, Adam's moments)
        opt.zero_grad()
        obj.inner_terms(model, batch()).loss().backward()
        opt.step()
    return BilevelProblem.from_model(model, opt, obj, [batch() for _ in range(unroll)], batch(20), "fixed")


@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_finite_difference_with_optimizer_carry_is_exact_when_the_inner_loss_is_linear(opt_name):
    """Zero loss Hessian: the carried difference equals the exact 5-step hypergradient; the truncated one (each
    gradient scaled by its own step only) does so for plain SGD alone."""
    problem = _linear_inner_problem(opt_name)
    exact = Unrolled()(problem).grads
    carried = FiniteDifference(alpha=0.01, optimizer_carry=True)(problem).grads
    for a, b in zip(carried, exact):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    truncated = FiniteDifference(alpha=0.01)(problem).grads
    gap = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(truncated, exact))
    assert (gap < 1e-7) if opt_name == "sgd" else (gap > 1e-3), gap
    if opt_name == "adam":  # a differentiated preconditioner makes the step non-linear in g: refused
        import dataclasses
        f = problem.optimizer
        nonlinear = dataclasses.replace(problem, optimizer=FunctionalOptimizer(f.hypers, f.optimizer, f._names,
                                                                               "differentiable"))
        with pytest.raises(ValueError, match="preconditioner='fixed'"):
            FiniteDifference(alpha=0.01, optimizer_carry=True)(nonlinear)


@pytest.mark.parametrize("seed", range(4))
def test_finite_difference_with_optimizer_carry_agrees_with_the_exact_hypergradient_under_adam(seed):
    """The PRM problem of the truncated xfail above (Adam, 5 steps): measured cosine 1.0000 and norm ratio
    1.00-1.01 on seeds 0-7, against cosine -0.44 to 1.00 and norm 0.2-0.5 for the truncated difference."""
    problem = _prm_problem(5, seed=seed, adam_warm_steps=20)
    exact = Unrolled()(problem).grads
    carried = FiniteDifference(alpha=0.01, optimizer_carry=True)(problem).grads
    assert _cosine(exact, carried) > 0.999
    assert dot(carried, carried) ** 0.5 == pytest.approx(dot(exact, exact) ** 0.5, rel=0.05)
    with pytest.raises(ValueError, match="scale='optimizer'"):
        FiniteDifference(scale=1.0, optimizer_carry=True)
    if seed == 0:  # the data-parallel optimizer's path (one process here): the same numbers
        import dataclasses

        from metareweight.distributed import DistributedContext, SyncedFunctionalOptimizer
        synced = dataclasses.replace(problem, optimizer=SyncedFunctionalOptimizer(problem.optimizer,
                                                                                   DistributedContext()))
        for a, b in zip(FiniteDifference(alpha=0.01, optimizer_carry=True)(synced).grads, carried):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_fast_exact_one_step_hypergradient_agrees_with_unrolled():
    from metareweight import available_methods, get_hypergradient
    if "fast" not in available_methods():
        pytest.skip("no fast hypergradient method registered")
    problem = _prm_problem(1)
    exact, fast = Unrolled()(problem).grads, get_hypergradient("fast")(problem).grads
    for a, b in zip(exact, fast):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


# ---- configs and the experiment --------------------------------------------------------------------------------------
def _script():
    from experiments import domain_weights
    return domain_weights


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("domain_weights*.yaml")), ids=lambda p: p.name)
def test_each_config_loads(path):
    from experiments.common import load_config
    dw = _script()
    task = "text" if "text" in path.name else "prm"
    cfg = load_config(str(path), dw.DEFAULTS[task])
    assert set(dw.DEFAULTS[task]) <= set(cfg)
    import argparse
    assert dw._task_from_config(str(path), argparse.ArgumentParser()) == task  # runs alone, `extends` followed


def test_fd_scale_config_reaches_the_finite_difference():
    dw = _script()
    assert dw.fd_scale(dict(fd_scale="plain")) == (1.0, False)
    assert dw.fd_scale(dict(fd_scale="optimizer")) == ("optimizer", False)
    assert dw.fd_scale(dict(fd_scale="carry")) == ("optimizer", True)
    with pytest.raises(ValueError, match="fd_scale must be one of"):
        dw.fd_scale(dict(fd_scale="betty"))
    assert DomainWeights.trainer_options(fd_scale=1.0)["hypergrad_options"] == {"alpha": 0.01, "scale": 1.0}
    assert DomainWeights.trainer_options(fd_carry=True)["hypergrad_options"] == {"alpha": 0.01, "scale": "optimizer",
                                                                                "optimizer_carry": True}
    assert DomainWeights.trainer_options("unrolled")["hypergrad_options"] is None


KEYS = {"domain_weights", "domain_quality", "quality_rank_corr", "metric_uniform", "metric_learned", "metric_name"}


def test_prm_script_smoke(tmp_path):
    out = tmp_path / "prm.json"
    _script().main(["--task", "prm", "--quick", "--out", str(out), "--plot", str(tmp_path / "w.png"), "--set",
                    "epochs=2", "warmup_epochs=1", "train_solutions=[12,12,12,12,12]", "meta_solutions=12",
                    "test_problems=10", "meta_batch_size=6"])
    r = json.loads(out.read_text())
    assert KEYS <= set(r) and r["metric_name"] == "best_of_n_accuracy"
    assert list(r["domain_weights"]) == list(prm.PRM_DOMAINS)
    assert np.mean(list(r["domain_weights"].values())) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "w.png").stat().st_size > 0


def test_text_script_smoke(tmp_path):
    pytest.importorskip("wordllama")
    pytest.importorskip("pyarrow")
    out = tmp_path / "text.json"
    _script().main(["--task", "text", "--quick", "--out", str(out), "--set", "epochs=1", "train_per_domain=20",
                    "meta_size=40", "test_size=40"])
    r = json.loads(out.read_text())
    assert KEYS <= set(r) and r["metric_name"] == "test_accuracy"
    assert r["domain_quality"] == pytest.approx({"Tops": 1.0, "Dresses": 0.85, "Bottoms": 0.7, "Intimate": 0.55,
                                                 "Jackets": 0.4})


def _check_mean_claims(r, clean, bad, gain=0.01):
    """The issue's claims on the means over seeds, with margins: the mean weights ranked by quality (Spearman at
    least 0.8), clean domains above 1.05 and bad ones below 0.95, learned weights better than uniform by ``gain``
    on average and at least as good (but for a 0.005 slack) in every seed."""
    w = r["domain_weights"]
    assert r["quality_rank_corr"] >= 0.8, w
    assert all(w[n] > 1.05 for n in clean) and all(w[n] < 0.95 for n in bad), w
    assert r["metric_learned"] >= r["metric_uniform"] + gain
    assert all(s["metric_learned"] >= s["metric_uniform"] - 0.005 for s in r["per_seed"]), r["per_seed"]


def _check_every_seed(r, clean, bad, margin=0.05):
    """The ranking claims in every single seed: Spearman at least 0.8, clean above 1 + ``margin``, bad below
    1 − ``margin``."""
    for s in r["per_seed"]:
        w = s["domain_weights"]
        assert s["quality_rank_corr"] >= 0.8, (s["seed"], w)
        assert all(w[n] > 1 + margin for n in clean) and all(w[n] < 1 - margin for n in bad), (s["seed"], w)


def _check_claims(r, clean, bad):
    _check_mean_claims(r, clean, bad)
    _check_every_seed(r, clean, bad)


def _run_prm(config: str, seeds=None):
    args = ["--task", "prm", "--config", str(ROOT / "configs" / config)]
    return _script().main(args + (["--seeds", *map(str, seeds)] if seeds else []))


PRM_CLEAN, PRM_BAD = ["clean_a", "clean_b"], ["shifted", "noisy"]
CONFLICT = "domain_weights_prm_conflict.yaml"
FRESH_SEEDS = list(range(25, 35))


@pytest.fixture(scope="module")
def prm_fresh():
    """The primary PRM configuration on fresh seeds 25-34, run once after it was fixed (about 10 minutes)."""
    return _run_prm(CONFLICT, FRESH_SEEDS)


FD_FIX = ("measured after the finite-difference fix (commit 6a9d630; RESULTS.md): the shifted domain ends at about 1 "
          "(mean 1.013 on design seeds 0-4, 0.992 on fresh seeds 25-34, per seed 0.90-1.02), not below 0.95")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=FD_FIX)
def test_prm_learned_domain_weights_order_domains_and_beat_uniform_on_design_seeds():
    """Design seeds 0-4 (about 5 minutes), on which shifted_habit was chosen: best-of-8 is near the oracle in both
    runs (0.991 uniform, 0.995 learned), so the average gain is asserted only to be >= 0."""
    r = _run_prm(CONFLICT)
    _check_mean_claims(r, PRM_CLEAN, PRM_BAD, gain=0.0)
    assert all(s["domain_weights"]["noisy"] < 0.95 for s in r["per_seed"]), r["per_seed"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=FD_FIX)
def test_prm_learned_domain_weights_order_domains_and_beat_uniform_on_fresh_seeds(prm_fresh):
    """Measured on seeds 25-34 after the finite-difference fix: mean weights 1.13 / 1.14 / 1.01 / 0.99 / 0.72,
    best-of-8 0.988 learned vs 0.975 uniform, learned >= uniform in all 10 seeds, Spearman 0.97 in every seed."""
    _check_mean_claims(prm_fresh, PRM_CLEAN, PRM_BAD)
    for s in prm_fresh["per_seed"]:
        w = s["domain_weights"]
        assert all(w[n] > 1.0 for n in PRM_CLEAN) and w["noisy"] < 0.95, (s["seed"], w)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=FD_FIX)
def test_prm_every_fresh_seed_ranks_the_domains(prm_fresh):
    _check_every_seed(prm_fresh, PRM_CLEAN, PRM_BAD)


@pytest.mark.slow
def test_prm_carried_finite_difference_meets_every_claim_on_fresh_seeds():
    """``configs/domain_weights_prm_carry.yaml`` (chosen on design seeds 0-4 before its fresh run) on fresh seeds
    35-44 (about 6 minutes; RESULTS.md has all of 35-64): measured mean weights 1.25 / 1.25 / 0.99 / 0.93 / 0.59,
    best-of-8 +0.87 points, learned >= uniform in every seed, Spearman >= 0.87 in every seed. (On 35-64: shifted
    0.936 +- 0.013, below 1 in 26 of 30.)"""
    r = _run_prm("domain_weights_prm_carry.yaml", list(range(35, 45)))
    _check_mean_claims(r, PRM_CLEAN, PRM_BAD, gain=0.005)
    for s in r["per_seed"]:
        w = s["domain_weights"]
        assert s["quality_rank_corr"] >= 0.8 and all(w[n] > 1.05 for n in PRM_CLEAN) and w["noisy"] < 0.95, s


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured after the finite-difference fix (RESULTS.md): the gain shrinks to "
                   "+0.4 points (0.671 vs 0.667) and seed 2 is below uniform (0.673 vs 0.681); weights still ranked")
def test_text_learned_domain_weights_order_departments_by_noise_and_beat_uniform():
    pytest.importorskip("wordllama")
    r = _script().main(["--task", "text", "--config", str(ROOT / "configs/domain_weights_text.yaml")])
    _check_claims(r, clean=["Tops"], bad=["Intimate", "Jackets"])


@pytest.mark.slow
def test_text_exact_hypergradient_claims_on_twenty_fresh_seeds():
    """Seeds 3-22 with ``hypergrad=unrolled`` (about 1.5 minutes; RESULTS.md): measured mean weights 1.38 / 1.12 /
    0.96 / 0.80 / 0.74, Spearman 1.0, learned 0.688 vs 0.669 uniform, ahead in all 20 seeds. (The shipped finite
    difference on the same seeds: +0.9 points, below this test's 1-point margin.)"""
    pytest.importorskip("wordllama")
    r = _script().main(["--task", "text", "--config", str(ROOT / "configs/domain_weights_text.yaml"), "--set",
                        "hypergrad=unrolled", "seeds=[" + ",".join(map(str, range(3, 23))) + "]"])
    _check_mean_claims(r, clean=["Tops"], bad=["Intimate", "Jackets"])


def test_learned_run_with_frozen_weights_reproduces_the_uniform_baseline():
    """The comparison is fair: with meta_lr = 0 the meta-trained run takes exactly the baseline's steps."""
    dw = _script()
    cfg = dict(dw.DEFAULTS["prm"], epochs=2, warmup_epochs=1, train_solutions=[10] * 5, meta_solutions=8,
               test_problems=4, meta_batch_size=4, meta_lr=0.0)
    train, meta, make_model, make_objective, evaluate, _, _ = dw.prm_task(0, cfg)
    models = []
    orig = dw.train_uniform
    try:  # capture the baseline's model by wrapping the baseline loop
        dw.train_uniform = lambda m, *a: (models.append(m), orig(m, *a))[1]
        dw.run_pair(0, cfg, train, meta, make_model, make_objective, evaluate)
    finally:
        dw.train_uniform = orig
    uniform, learned = models[0], models[1]
    for (n, a), (_, b) in zip(uniform.named_parameters(), learned.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_task_comes_from_the_config_when_not_given(capsys):
    import argparse
    script = _script()
    parser = argparse.ArgumentParser()
    assert script._task_from_config(str(ROOT / "configs" / "domain_weights_prm.yaml"), parser) == "prm"
    assert script._task_from_config(str(ROOT / "configs" / "domain_weights_text.yaml"), parser) == "text"
    with pytest.raises(SystemExit):
        script._task_from_config(None, parser)
    assert "give --task" in capsys.readouterr().err
