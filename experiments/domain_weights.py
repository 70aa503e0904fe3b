"""Domain weights (DreamPRM) vs uniform weights, on generated PRM domains and on real text domains.

    python -m experiments.domain_weights --task prm --quick --out r.json
    python -m experiments.domain_weights --task text --config configs/domain_weights_text.yaml --out r.json
    python -m experiments.domain_weights --task prm --set seeds=[0,1,2] epochs=40 --plot docs/img/domain_weights_prm.png

``--task prm``: a small slot-shared process reward model scores arithmetic-chain step prefixes
(:mod:`metareweight.data.prm`); training domains of known quality (clean ×2, trivially easy, shifted sibling task
whose solver falls back on the target rule in ``shifted_habit`` of its steps, inverted step labels); the meta set
is whole solutions with outcome labels and DreamPRM's aggregation loss; metric: best-of-N selection accuracy on
held-out problems. ``fd_scale``: ``optimizer`` (default), ``plain`` (Betty's unscaled darts) or ``carry`` (the
optimizer's scale carried through its state to the last lower step: ``FiniteDifference(optimizer_carry=True)``).
``--task text``: Women's E-Commerce reviews (positive = rating ≥ 4, negative = rating ≤ 3), one domain per
department, each with its own injected label-flip rate; frozen WordLlama features, an MLP classifier, a clean meta
set; metric: clean test accuracy.

Uniform weights train the same model on the same batches with every α = 1. Output JSON keys: ``domain_weights``,
``domain_quality``, ``quality_rank_corr`` (Spearman, learned weight vs quality), ``metric_uniform``,
``metric_learned``, ``metric_name`` (means over seeds; the final epoch's metric), ``per_seed`` (with the metric after
every epoch, ``curve_uniform`` / ``curve_learned``) and ``trajectory`` (first seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.common import (add_config_args, config_from_args, mean_sd, mlp, save_png, seed_everything, spearman,
                                table, train_plain, write_json)
from metareweight import Callback, MetaTrainer, TensorIndexedDataset
from metareweight.data import Batch
from metareweight.data import prm
from metareweight.objectives.domain_weights import DomainWeights, StepAggregationLoss

COMMON = dict(epochs=30, warmup_epochs=0, batch_size=64, meta_batch_size=32, hidden=64, lr=1e-3, lr_schedule="constant",
              meta_lr=0.05, hypergrad="finite_difference", unroll_steps=5, fd_scale="optimizer")
LR_SCHEDULES = ("constant", "cosine")
# the finite difference's direction: v scaled by the lower optimizer's step scale, or v itself (Betty's darts)
FD_SCALES = {"optimizer": ("optimizer", False), "plain": (1.0, False), "carry": ("optimizer", True)}
DEFAULTS = {
    "prm": dict(COMMON, epochs=40, hidden=64, lr=3e-3, lr_schedule="cosine", meta_batch_size=200, meta_lr=0.01,
                warmup_epochs=5, train_solutions=[150, 150, 300, 300, 300], meta_solutions=200, test_problems=300,
                candidates=8, completions=16, step_error=0.12, completion_error=0.03, shifted_habit=0.0),
    "text": dict(COMMON, epochs=20, batch_size=32, meta_batch_size=300, meta_lr=0.02,
                 departments=["Tops", "Dresses", "Bottoms", "Intimate", "Jackets"],
                 noise_rates=[0.0, 0.15, 0.3, 0.45, 0.6], train_per_domain=300, meta_size=300, test_size=1500),
}
QUICK = {"prm": dict(epochs=12, warmup_epochs=3), "text": dict(epochs=10)}


class SlotPRM(nn.Module):
    """A small PRM for :mod:`metareweight.data.prm` prefixes: one MLP shared by every step slot (so a step check
    learnt once applies at every position), summed over the filled slots, then a head that also sees the prefix
    position and chain length. Returns one logit per prefix."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.slot = nn.Sequential(nn.Linear(prm.SLOT, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(hidden + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :prm.MAX_STEPS * prm.SLOT].reshape(x.shape[0], prm.MAX_STEPS, prm.SLOT)
        pooled = (self.slot(s) * s[..., :1]).sum(1)
        return self.head(torch.cat([pooled, x[:, -2:]], 1))


class EpochMetric(Callback):
    """Appends ``evaluate(model)`` to ``curve`` after every epoch (the metric's learning curve)."""

    def __init__(self, evaluate: Callable, curve: List[float]):
        self.evaluate, self.curve = evaluate, curve

    def on_epoch_end(self, trainer, metrics) -> None:
        self.curve.append(self.evaluate(trainer.model))


class WeightTrajectory(Callback):
    """Records the domain weights after every meta step (``offset``: real steps taken before the trainer ran)."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.steps: List[int] = []
        self.weights: List[List[float]] = []

    def on_step_end(self, trainer, metrics) -> None:
        self.steps.append(self.offset + trainer.global_step)
        self.weights.append(list(trainer.objective.named_weights().values()))


def lr_scheduler(optimizer, cfg: Dict):
    """The θ learning-rate schedule, stepped once per epoch in both runs: ``constant`` (None) or ``cosine`` (from
    ``lr`` towards 0 over ``epochs``, warm-up included, so both runs end converged on the same schedule)."""
    if cfg["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg['lr_schedule']!r}")
    if cfg["lr_schedule"] == "constant":
        return None
    epochs = cfg["epochs"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1.0 + np.cos(np.pi * e / epochs)))


def fd_scale(cfg: Dict):
    """The ``fd_scale`` config value as :meth:`DomainWeights.trainer_options`' ``(fd_scale, fd_carry)``."""
    if cfg["fd_scale"] not in FD_SCALES:
        raise ValueError(f"fd_scale must be one of {sorted(FD_SCALES)}, got {cfg['fd_scale']!r}")
    return FD_SCALES[cfg["fd_scale"]]


def train_uniform(model, optimizer, loader, objective: DomainWeights, epochs: int, scheduler=None,
                  evaluate: Optional[Callable] = None) -> List[float]:
    """The baseline: the same weighted loss with every domain weight at 1 (φ = 0, never updated). Returns
    ``evaluate(model)`` after every epoch (empty without ``evaluate``)."""
    return train_plain(model, optimizer, loader, epochs, loss=lambda m, b, epoch: objective.inner_terms(m, b).loss(),
                       scheduler=scheduler, evaluate=evaluate)


def run_pair(seed: int, cfg: Dict, train: TensorIndexedDataset, meta: TensorIndexedDataset, make_model: Callable,
             make_objective: Callable[[], DomainWeights], evaluate: Callable) -> Dict:
    """Train with uniform and with learned domain weights from the same initialisation, batch order and lr schedule.

    The learned run first trains ``warmup_epochs`` with uniform weights (identical to the baseline's first epochs):
    while the model is still learning the overall score level, every domain's gradient mostly moves that level and
    the hypergradient says little about a domain's quality."""
    if not 0 <= cfg["warmup_epochs"] < cfg["epochs"]:
        raise ValueError(f"warmup_epochs must lie in 0..epochs-1, got {cfg['warmup_epochs']} for {cfg['epochs']} epochs")
    def setup():
        seed_everything(seed)
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        # separate generators: drawing meta batches must not change the order of the training batches
        return (model, opt, lr_scheduler(opt, cfg),
                DataLoader(train, batch_size=cfg["batch_size"], shuffle=True,
                           generator=torch.Generator().manual_seed(seed)),
                DataLoader(meta, batch_size=cfg["meta_batch_size"], shuffle=True,
                           generator=torch.Generator().manual_seed(seed + 10_000)))

    model, opt, sched, loader, _ = setup()
    curve_uniform = train_uniform(model, opt, loader, make_objective(), cfg["epochs"], sched, evaluate)

    model, opt, sched, loader, meta_loader = setup()
    objective = make_objective()
    curve_learned = train_uniform(model, opt, loader, objective, cfg["warmup_epochs"], sched, evaluate)
    traj = WeightTrajectory(offset=cfg["warmup_epochs"] * len(loader))
    trainer = MetaTrainer(model, opt, loader, objective=objective, meta_loader=meta_loader,
                          callbacks=[traj, EpochMetric(evaluate, curve_learned)],
                          adam_preconditioner="fixed", progress=False, scheduler=sched,
                          **DomainWeights.trainer_options(cfg["hypergrad"], cfg["unroll_steps"], *fd_scale(cfg)))
    trainer.fit(epochs=cfg["epochs"] - cfg["warmup_epochs"])
    # the reported metric is the final epoch's, for both runs
    return {"seed": seed, "metric_uniform": curve_uniform[-1], "metric_learned": curve_learned[-1],
            "curve_uniform": curve_uniform, "curve_learned": curve_learned, "warmup_steps": traj.offset,
            "domain_weights": objective.named_weights(),
            "trajectory": {"step": traj.steps, "weights": traj.weights}}


# ---- task A: process reward model ---------------------------------------------------------------------------------
def prm_task(seed: int, cfg: Dict):
    domains = prm.prm_domains(cfg["shifted_habit"])
    names = list(domains)
    if len(cfg["train_solutions"]) != len(names):
        raise ValueError(f"train_solutions needs one count per PRM domain {names}")
    rng = np.random.default_rng(seed)
    xs, ys, ds = [], [], []
    for k, (name, n) in enumerate(zip(names, cfg["train_solutions"])):
        f, lab = prm.domain_examples(rng, name, n, cfg["completions"], cfg["step_error"], cfg["completion_error"],
                                     domains)
        xs.append(f), ys.append(lab), ds.append(np.full(len(lab), k))
    train = TensorIndexedDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                                 domain=torch.from_numpy(np.concatenate(ds)))
    meta_sols = prm.sample_solutions(rng, cfg["meta_solutions"], step_error=cfg["step_error"])
    meta = TensorIndexedDataset(torch.from_numpy(prm.prefix_features(meta_sols)),
                                torch.from_numpy(meta_sols.correct().astype(np.float32)),
                                step_mask=torch.from_numpy(prm.step_mask(meta_sols)))
    problems = prm.sample_problems(rng, cfg["test_problems"])
    cands = prm.solve(rng, prm.repeat(problems, cfg["candidates"]), cfg["step_error"])
    test = Batch(torch.from_numpy(prm.prefix_features(cands)),
                 extras={"step_mask": torch.from_numpy(prm.step_mask(cands))})
    correct = cands.correct().reshape(-1, cfg["candidates"])
    scorer = StepAggregationLoss()

    @torch.no_grad()
    def best_of_n(model) -> float:
        scores = scorer.scores(model, test).reshape(-1, cfg["candidates"]).numpy()
        return float(correct[np.arange(len(correct)), scores.argmax(1)].mean())

    make_objective = lambda: DomainWeights(len(names), loss="mse", aggregation="step_mse",  # noqa: E731
                                           meta_lr=cfg["meta_lr"], names=names)
    make_model = lambda: SlotPRM(cfg["hidden"])  # noqa: E731
    quality = {n: domains[n][0] for n in names}
    extra = {"random_pick": float(correct.mean()), "oracle": float(correct.any(1).mean())}
    return train, meta, make_model, make_objective, best_of_n, quality, extra


# ---- task B: real text domains -----------------------------------------------------------------------------------
def text_task(seed: int, cfg: Dict):
    from metareweight.data.noise import symmetric_noise
    from metareweight.data.text import embed, load_womens_reviews

    deps, rates = cfg["departments"], cfg["noise_rates"]
    if len(deps) != len(rates):
        raise ValueError(f"{len(deps)} departments but {len(rates)} noise_rates")
    df = load_womens_reviews()
    df["label"] = (df.rating >= 4).astype(int)
    rng = np.random.default_rng(seed)
    per_class = cfg["train_per_domain"] // 2
    train_idx, dom, held = [], [], []
    for k, dep in enumerate(deps):
        rows = df.index[df.department == dep].to_numpy()
        if len(rows) == 0:
            raise ValueError(f"no reviews in department {dep!r}")
        for c in (0, 1):
            pool = rng.permutation(rows[df.label.to_numpy()[rows] == c])
            if len(pool) < per_class:
                raise ValueError(f"department {dep!r} has only {len(pool)} reviews of class {c}; "
                                 f"lower train_per_domain (now {cfg['train_per_domain']})")
            train_idx.append(pool[:per_class]), dom.append(np.full(per_class, k)), held.append(pool[per_class:])
    train_idx, dom = np.concatenate(train_idx), np.concatenate(dom)
    held = np.concatenate(held)
    # meta and test sets: clean, class-balanced, from the same departments
    held0, held1 = [rng.permutation(held[df.label.to_numpy()[held] == c]) for c in (0, 1)]
    m, t = cfg["meta_size"] // 2, cfg["test_size"] // 2
    meta_idx = np.concatenate([held0[:m], held1[:m]])
    test_idx = np.concatenate([held0[m:m + t], held1[m:m + t]])
    feats = torch.from_numpy(embed(df.text.tolist()))
    labels = df.label.to_numpy()
    y_train = labels[train_idx].copy()
    for k, rate in enumerate(rates):
        sel = dom == k
        y_train[sel], _ = symmetric_noise(y_train[sel], rate, 2, seed=seed * 100 + k)
    train = TensorIndexedDataset(feats[train_idx], torch.from_numpy(y_train), domain=torch.from_numpy(dom))
    meta = TensorIndexedDataset(feats[meta_idx], torch.from_numpy(labels[meta_idx]))
    x_test, y_test = feats[test_idx], torch.from_numpy(labels[test_idx])

    @torch.no_grad()
    def test_accuracy(model) -> float:
        return float((model(x_test).argmax(1) == y_test).float().mean())

    make_objective = lambda: DomainWeights(len(deps), loss="cross_entropy", aggregation="cross_entropy",  # noqa: E731
                                           meta_lr=cfg["meta_lr"], names=list(deps))
    make_model = lambda: mlp(feats.shape[1], cfg["hidden"], 2, depth=1)  # noqa: E731
    quality = {d: 1.0 - r for d, r in zip(deps, rates)}
    return train, meta, make_model, make_objective, test_accuracy, quality, {}


TASKS = {"prm": (prm_task, "best_of_n_accuracy"), "text": (text_task, "test_accuracy")}


def run(task: str, cfg: Dict, seeds: List[int]) -> Dict:
    build, metric_name = TASKS[task]
    per_seed = []
    for seed in seeds:
        train, meta, make_model, make_objective, evaluate, quality, extra = build(seed, cfg)
        r = run_pair(seed, cfg, train, meta, make_model, make_objective, evaluate)
        r["quality_rank_corr"] = spearman([r["domain_weights"][n] for n in quality], list(quality.values()))
        per_seed.append({**r, **extra})
    names = list(quality)
    weights = {n: float(np.mean([r["domain_weights"][n] for r in per_seed])) for n in names}
    keep = ("seed", "metric_uniform", "metric_learned", "quality_rank_corr", "domain_weights", "curve_uniform",
            "curve_learned", *extra)
    return {"task": task, "metric_name": metric_name, "domain_weights": weights, "domain_quality": quality,
            "quality_rank_corr": spearman(list(weights.values()), list(quality.values())),
            "metric_uniform": float(np.mean([r["metric_uniform"] for r in per_seed])),
            "metric_learned": float(np.mean([r["metric_learned"] for r in per_seed])),
            "per_seed": [{k: r[k] for k in keep} for r in per_seed], "trajectory": per_seed[0]["trajectory"],
            "warmup_steps": per_seed[0]["warmup_steps"]}


def save_plot(result: Dict, path: Path) -> None:
    """Left: the first seed's weight trajectory. Right: the metric after every epoch, both runs, every seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_metric) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    _plot_weights(ax, result)
    _plot_curves(ax_metric, result)
    save_png(fig, path)


def _plot_weights(ax, result: Dict) -> None:
    traj = result["trajectory"]
    w = np.asarray(traj["weights"])
    for k, (name, q) in enumerate(result["domain_quality"].items()):
        ax.plot(traj["step"], w[:, k], label=f"{name} (quality {q:.2f})")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    warm = result.get("warmup_steps", 0)
    if warm:
        ax.axvspan(0, warm, color="grey", alpha=0.15, label="uniform warm-up")
    ax.set_xlabel("training step")
    ax.set_ylabel("domain weight α")
    ax.set_title(f"DreamPRM domain weights, task {result['task']} (seed {result['per_seed'][0]['seed']})")
    ax.legend(fontsize=8)


def _plot_curves(ax, result: Dict) -> None:
    for key, color, label in (("curve_uniform", "tab:grey", "uniform"), ("curve_learned", "tab:blue", "learned")):
        curves = np.asarray([s[key] for s in result["per_seed"]])
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.T, color=color, lw=0.6, alpha=0.35)
        ax.plot(epochs, curves.mean(0), color=color, lw=2, label=f"{label} (mean of {len(curves)} seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(result["metric_name"].replace("_", " "))
    ax.set_title("metric after every epoch (thin: single seeds)")
    ax.legend(fontsize=8)


def _task_from_config(path: Optional[str], parser: argparse.ArgumentParser) -> str:
    """The task named by a config's ``experiment: domain_weights_<task>`` key (``extends`` followed), so a config
    alone runs."""
    from metareweight.config import read_yaml

    name = read_yaml(path).get("experiment", "") if path else ""
    task = str(name).rsplit("_", 1)[-1]
    if task not in TASKS:
        parser.error(f"give --task {{{','.join(sorted(TASKS))}}}, or a --config whose experiment is "
                     f"domain_weights_<task> (got {name!r})")
    return task


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS),
                   help="default: from the config's `experiment:` key (domain_weights_prm / domain_weights_text)")
    add_config_args(p)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--plot", help="write the weight-trajectory PNG here")
    args = p.parse_args(argv)
    args.task = args.task or _task_from_config(args.config, p)
    torch.set_num_threads(1)
    cfg = config_from_args(args, DEFAULTS[args.task], QUICK[args.task])
    seeds = args.seeds or cfg.get("seeds") or [0]
    result = run(args.task, cfg, seeds)
    rows = [(n, f"{result['domain_quality'][n]:.2f}", f"{w:.3f}") for n, w in result["domain_weights"].items()]
    print(f"\ntask {args.task}, seeds {seeds}: Spearman(weight, quality) = {result['quality_rank_corr']:.3f}")
    print(table(rows, ["domain", "quality", "learned weight"]))
    print(table([("uniform", mean_sd([r["metric_uniform"] for r in result["per_seed"]])),
                 ("learned (DreamPRM)", mean_sd([r["metric_learned"] for r in result["per_seed"]]))],
                ["domain weights", result["metric_name"]]))
    if args.plot:
        save_plot(result, Path(args.plot))
        print(f"weight trajectory: {args.plot}")
    write_json(args.out, {**result, "config": cfg, "seeds": seeds})
    return result


if __name__ == "__main__":
    main()
