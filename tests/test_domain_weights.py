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


# ---- hypergradients on a small float64 PRM problem ------------------------------------------------------------------
def _prm_problem(unroll: int, lr: float = 0.5, seed: int = 0, aggregation: str = "step_mse"):
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
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    fopt = FunctionalOptimizer.from_torch(opt, model)
    return BilevelProblem(model=model, params={n: p.detach() for n, p in model.named_parameters()}, buffers={},
                          optimizer=fopt, opt_state=fopt.read_state(), meta_params=obj.meta_parameters(),
                          inner=obj.inner_terms, outer=obj.outer_loss, train_batches=batches, meta_batch=meta)


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


def _check_claims(r, clean, bad, bad_on_mean=()):
    """The issue's claims, with margins: rank order (the mean weights and every seed), clean above 1 and bad below 1
    (mean over seeds and every seed; ``bad_on_mean`` domains below 1 on the mean weights only), and learned weights
    at least as good as uniform on average and in every seed but by a small slack."""
    assert r["quality_rank_corr"] >= 0.8, r["domain_weights"]
    assert all(s["quality_rank_corr"] >= 0.8 for s in r["per_seed"]), [s["domain_weights"] for s in r["per_seed"]]
    assert all(r["domain_weights"][n] < 1.0 for n in bad_on_mean), r["domain_weights"]
    for s in [r] + r["per_seed"]:
        w = s["domain_weights"]
        assert all(w[n] > 1.05 for n in clean) and all(w[n] < 0.95 for n in bad), w
    assert r["metric_learned"] >= r["metric_uniform"] + 0.01
    assert all(s["metric_learned"] >= s["metric_uniform"] - 0.005 for s in r["per_seed"]), r["per_seed"]


PRM_CLAIMS = dict(clean=["clean_a", "clean_b"], bad=["noisy"], bad_on_mean=["shifted"])


@pytest.mark.slow
def test_prm_learned_domain_weights_order_domains_and_beat_uniform_best_of_n():
    """The configured seeds 0-4 (about 8 minutes), on which the configuration was chosen (RESULTS.md): shifted is
    below 1 on the mean weights (0.95) but not in every seed (seed 4: 1.06), so it is asserted on the mean only."""
    r = _script().main(["--task", "prm", "--config", str(ROOT / "configs/domain_weights_prm.yaml")])
    _check_claims(r, **PRM_CLAIMS)


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], ids=["seeds5-9", "seeds10-14"])
@pytest.mark.xfail(strict=False, reason="not met on fresh seeds as measured (RESULTS.md): the learned run stays on the "
                   "pre-step-check plateau in seeds 5 and 12 (best-of-8 0.78 and 0.72), and shifted is 1.03 on the "
                   "mean weights of seeds 10-14")
def test_prm_claims_on_fresh_seeds(seeds):
    r = _script().main(["--task", "prm", "--config", str(ROOT / "configs/domain_weights_prm.yaml"),
                        "--seeds", *map(str, seeds)])
    _check_claims(r, **PRM_CLAIMS)


@pytest.mark.slow
def test_text_learned_domain_weights_order_departments_by_noise_and_beat_uniform():
    pytest.importorskip("wordllama")
    r = _script().main(["--task", "text", "--config", str(ROOT / "configs/domain_weights_text.yaml")])
    _check_claims(r, clean=["Tops"], bad=["Intimate", "Jackets"])


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
