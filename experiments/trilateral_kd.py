"""TGeo-KD (learned per-sample KD fusion ratio, bilevel) vs CE, fixed-α KD and WLS-KD on three tasks.

    python -m experiments.trilateral_kd --task image --quick --out r.json
    python -m experiments.trilateral_kd --config configs/trilateral_kd_image.yaml --workers 3 --out results/trilateral_kd_image.json
    python -m experiments.trilateral_kd --task ctr --set seeds=[0,1] epochs=3
    python -m experiments.trilateral_kd --config configs/trilateral_kd_image.yaml --signal 1 5 15 --out signal.json

Tasks (all offline):
- ``image``: Fashion-MNIST subsample; a small CNN teacher trained on its own split, a one-hidden-layer MLP student.
  The cached teacher logits are corrupted on the student's (non-outlier) training samples
  (:func:`~experiments.kd_tasks.corrupt_teacher`):
  ``corrupt_mode="random"`` rolls them to a random wrong class on ``corrupt_frac`` of the samples;
  ``corrupt_mode="class"`` rolls them, one shift per class, on every sample of ``corrupt_classes`` classes drawn
  per seed (a teacher systematically wrong on a subset of classes). ``outlier_frac`` of the inputs get additive
  Gaussian noise of std ``outlier_std`` (the teacher sees the noisy input and is often wrong on it).
  ``label_noise`` flips that fraction of the student's training labels to a random other class (symmetric noise;
  the meta and test splits stay clean), so "teacher wrong, label right" and "label wrong, teacher right" coexist.
- ``attack``: Spambase (or river Phishing, ``dataset=phishing``); MLP teacher on its own split, tiny MLP student.
- ``ctr``: MovieLens-100K click (rating ≥ 4), temporal split; embedding+MLP teacher on one half of the training
  period, a tiny embedding student on the other half; metric AUC.

Methods: ``ce`` (α = 0), fixed-α KD over ``kd_alphas`` (``kd_fixed_best`` = the α with the best mean test metric
over seeds, an oracle choice that favours the baseline), ``wls`` (WLS-KD), ``tgeo`` (the bilevel ratio network,
``metareweight.TrilateralKD``) and its ablations ``tgeo_no_tbar`` / ``tgeo_no_st``. All share the student, optimiser,
epochs and the KD terms. T̄ is computed once over the student's training split from the cached (possibly corrupted)
teacher logits. α statistics are computed after training on the training split: ``alpha_teacher_wrong`` /
``alpha_teacher_right`` over non-outlier samples whose (given) teacher prediction is wrong / right, ``alpha_outlier``
over the noisy inputs, ``alpha_label_flipped`` over non-outlier samples with a flipped label and a right teacher
(``teacher_right`` then excludes them); "wrong" is about the true label; means over seeds. ``agree_alphas`` (empty
by default) adds a diagnostic reference, ``kd_agree_best``: KD with α where the teacher's argmax agrees with the
label and 0 elsewhere (best grid value by mean test metric), i.e. the per-sample α an oracle for "teacher wrong"
would set; ``oracle_alphas`` adds ``kd_oracle_best``, the two-flag oracle (:func:`oracle_alpha`: 0 where the teacher
is wrong, 1 where the label is flipped and the teacher right, the grid value elsewhere). ``run_tgeo=false`` runs
only the fixed rules (the room check before any learned run).

Knobs of the learned ratio (defaults as in the first version): ``init_alpha``, ``meta_lr``, ``meta_batch_size``
(0: the training batch size), ``hypergrad``, ``unroll_steps``; ``lr_schedule`` (``constant`` or ``cosine``, per
epoch) applies to every method's student.

``--signal E1 E2 ...`` skips the methods and reports, for a student trained E epochs with WLS-KD, the one-step meta
signal on each sample's α (:func:`per_sample_signal`) by group: does the bilevel gradient tell the ratio network to
lower α where the teacher is wrong?
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from experiments.common import (add_config_args, config_from_args, mean_and_se, mean_sd, save_png, seed_everything,
                                table, train_plain, write_json)
from experiments.kd_tasks import (BUILDERS, FieldEmbeddingNet, KDTask, SmallCNN, attack_task, corrupt_teacher,
                                  ctr_task, fit_teacher, flip_labels, image_task, make_train_set, predict, roll_logits)
from metareweight import MetaTrainer, TensorIndexedDataset, TrilateralKD, teacher_class_means
from metareweight.data import Batch
from metareweight.objectives.kd_baselines import KDLoss, fusion_weights, kd_terms

__all__ = [
    # this experiment
    "TASKS", "DEFAULTS", "QUICK", "GRIDS", "main", "run_seed", "summarise", "train_tgeo", "train_fixed_rule",
    "fit_student", "rule_loss", "oracle_alpha", "oracle_loss", "reference_losses", "per_sample_signal",
    "alpha_signal", "sample_groups", "alpha_stats", "save_alpha_plot", "report_signal",
    # the tasks it runs on, re-exported from experiments.kd_tasks (tests and the notebook use them from here)
    "BUILDERS", "KDTask", "SmallCNN", "FieldEmbeddingNet", "image_task", "attack_task", "ctr_task", "fit_teacher",
    "corrupt_teacher", "flip_labels", "roll_logits", "make_train_set", "predict",
]

TASKS = ("image", "attack", "ctr")
_COMMON = dict(epochs=12, batch_size=100, lr=0.05, lr_schedule="constant", momentum=0.9, weight_decay=5e-4,
               temperature=2.0, kd_alphas=[0.25, 0.5, 0.75, 0.9], agree_alphas=[], oracle_alphas=[], run_tgeo=True,
               ratio_hidden=64, init_alpha=0.5,
               meta_lr=3e-3, meta_weight_decay=0.0, meta_batch_size=0, hypergrad="unrolled", unroll_steps=1,
               ablations=["no_tbar", "no_st"], teacher_epochs=5, teacher_lr=1e-3)
DEFAULTS: Dict[str, Dict] = {
    "image": dict(_COMMON, task="image", n_teacher=6000, n_train=2000, n_meta=500, n_test=5000, student_hidden=32,
                  corrupt_mode="random", corrupt_frac=0.3, corrupt_classes=3, label_noise=0.0, outlier_frac=0.15,
                  outlier_std=2.0, teacher_epochs=3, epochs=20, batch_size=50,
                  temperature=1.0, meta_lr=1e-2, kd_alphas=[0.25, 0.5, 0.75]),
    "attack": dict(_COMMON, task="attack", dataset="spambase", test_fraction=0.25, meta_fraction=0.08,
                   student_hidden=4, teacher_hidden=256, epochs=30, batch_size=50, teacher_epochs=40),
    "ctr": dict(_COMMON, task="ctr", n_rows=0, meta_fraction=0.05, test_fraction=0.2, student_dim=2, teacher_dim=16,
                teacher_hidden=64, epochs=4, batch_size=256, lr=0.1, teacher_epochs=3, kd_alphas=[0.25, 0.5, 0.75]),
}
QUICK: Dict[str, Dict] = {
    "image": dict(n_teacher=3000, n_train=1500, n_meta=200, n_test=2000, epochs=8),
    "attack": dict(epochs=15, teacher_epochs=20),
    "ctr": dict(n_rows=30000, epochs=2, teacher_epochs=2),
}


# ---- methods ----------------------------------------------------------------------------------------------------
def _student(task: KDTask, cfg: Dict, seed: int):
    """A fresh student, its SGD optimizer and its per-epoch learning-rate schedule (``lr_schedule``)."""
    seed_everything(seed)
    model = task.make_student()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["lr_schedule"] not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg['lr_schedule']!r}")
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"]) if cfg["lr_schedule"] == "cosine"
             else None)
    return model, opt, sched


def _loader(ds, cfg: Dict, seed: int, batch_size: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size or cfg["batch_size"], shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


BatchLoss = Callable[[torch.Tensor, Batch], torch.Tensor]  # (student logits, batch) -> scalar loss


def rule_loss(rule: str, temperature: float, alpha: Optional[float] = None) -> BatchLoss:
    """A fixed-rule KD loss (:class:`KDLoss`) on a batch with cached teacher logits."""
    kd = KDLoss(rule, alpha, temperature)
    return lambda logits, b: kd(logits, b.extras["teacher_logits"], b.targets)


def oracle_alpha(batch: Batch, alpha: float) -> torch.Tensor:
    """The two-flag oracle ratio: 0 where the teacher is wrong (about the true label), 1 where the label was flipped
    and the teacher is right, ``alpha`` elsewhere. It reads the ground-truth flags no method sees."""
    wrong, flipped = batch.extras["teacher_wrong"], batch.extras["label_flipped"]
    const = torch.full(wrong.shape, float(alpha))
    return torch.where(wrong, torch.zeros_like(const), torch.where(flipped, torch.ones_like(const), const))


def oracle_loss(temperature: float, alpha: float) -> BatchLoss:
    """The KD loss with :func:`oracle_alpha` (a reference for how much room a per-sample ratio has)."""
    def loss(logits: torch.Tensor, b: Batch) -> torch.Tensor:
        terms = kd_terms(logits, b.extras["teacher_logits"], b.targets, temperature)
        return (fusion_weights(oracle_alpha(b, alpha).to(terms.dtype)) * terms).sum()
    return loss


def reference_losses(cfg: Dict) -> Dict[str, Callable[[float], BatchLoss]]:
    """The grid rules: name -> (α -> loss), with their grids in ``cfg[f"{name}_alphas"]`` (``kd_alphas`` for fixed)."""
    t = cfg["temperature"]
    return {"fixed": lambda a: rule_loss("fixed", t, a), "agree": lambda a: rule_loss("agree", t, a),
            "oracle": lambda a: oracle_loss(t, a)}


GRIDS = {"fixed": "kd_alphas", "agree": "agree_alphas", "oracle": "oracle_alphas"}


def train_fixed_rule(task: KDTask, cfg: Dict, seed: int, loss_fn: BatchLoss) -> float:
    """Train a fresh student with a fixed-rule KD loss; returns the test metric."""
    return task.metric(fit_student(task, cfg, seed, loss_fn, cfg["epochs"]))


def fit_student(task: KDTask, cfg: Dict, seed: int, loss_fn: BatchLoss, epochs: int) -> nn.Module:
    """A fresh student trained ``epochs`` epochs with a fixed-rule KD loss (the shared optimiser and schedule)."""
    model, opt, sched = _student(task, cfg, seed)
    loader = _loader(task.train, cfg, seed)  # one generator: a new order each epoch, as in MetaTrainer
    train_plain(model, opt, loader, epochs, loss=lambda m, b, epoch: loss_fn(m(b.inputs), b), scheduler=sched)
    return model


def per_sample_signal(model: nn.Module, task: KDTask, temperature: float) -> np.ndarray:
    """``g_i = ∇L_meta(θ) · (∇KD_i(θ) − ∇CE_i(θ))`` for every training sample, with L_meta the CE on the meta split.

    For a plain SGD lookahead step of size η on the mean loss over B samples, ``dL_meta(θ')/dα_i = −η·g_i/B`` to first
    order: ``g_i > 0`` says "raise α_i".
    """
    params = [p for p in model.parameters() if p.requires_grad]
    g_meta = torch.autograd.grad(F.cross_entropy(model(task.x_meta), task.y_meta), params)
    tr = task.train
    terms = kd_terms(model(tr.x), tr.extras["teacher_logits"], tr.y, temperature)
    signal = np.empty(len(tr.y))
    for i in range(len(tr.y)):
        grads = torch.autograd.grad(terms[i, 0] - terms[i, 1], params, retain_graph=True)
        signal[i] = float(sum((a * b).sum() for a, b in zip(g_meta, grads)))
    return signal


def alpha_signal(task: KDTask, cfg: Dict, seed: int, epochs: int) -> Dict[str, Dict[str, float]]:
    """:func:`per_sample_signal` by group (teacher right / wrong among non-outliers, outliers) for a student trained
    ``epochs`` epochs with WLS-KD: the mean, its standard error and the fraction of samples with ``g > 0``."""
    signal = per_sample_signal(fit_student(task, cfg, seed, rule_loss("wls", cfg["temperature"]), epochs),
                               task, cfg["temperature"])
    groups = sample_groups(task.train)
    return {name: {"mean": float(signal[m].mean()), "se": float(signal[m].std(ddof=1) / np.sqrt(m.sum())),
                   "frac_positive": float((signal[m] > 0).mean())} for name, m in groups.items() if m.sum() > 1}


def train_tgeo(task: KDTask, cfg: Dict, seed: int, features: str = "full") -> Dict:
    """Train a fresh student with the bilevel ratio network; returns the metric, final α and the α history."""
    model, opt, sched = _student(task, cfg, seed)
    tr = task.train
    objective = TrilateralKD(task.num_classes, class_means=teacher_class_means(tr.extras["teacher_logits"], tr.y,
                                                                               task.num_classes),
                             features=features, hidden=cfg["ratio_hidden"], temperature=cfg["temperature"],
                             init_alpha=cfg["init_alpha"],
                             meta_lr=cfg["meta_lr"], meta_weight_decay=cfg["meta_weight_decay"])
    meta = TensorIndexedDataset(task.x_meta, task.y_meta)
    trainer = MetaTrainer(model, opt, _loader(tr, cfg, seed), objective=objective,
                          meta_loader=_loader(meta, cfg, seed + 1, cfg["meta_batch_size"]), hypergrad=cfg["hypergrad"],
                          unroll_steps=cfg["unroll_steps"], scheduler=sched, progress=False)
    trainer.fit(epochs=cfg["epochs"])
    with torch.no_grad():
        alpha = objective.ratio(predict(model, tr.x), tr.extras["teacher_logits"], tr.y).numpy()
    return {"metric": task.metric(model), "alpha": alpha, "history": trainer.weights_history.arrays()}


def sample_groups(train: TensorIndexedDataset) -> Dict[str, np.ndarray]:
    """Masks of the diagnostic groups: ``outlier``; among inliers ``teacher_wrong`` (about the true label),
    ``label_flipped`` (teacher right) and ``teacher_right`` (teacher right, label clean)."""
    out_flag = train.extras["outlier"].numpy()
    wrong = train.extras["teacher_wrong"].numpy() & ~out_flag
    flipped = train.extras["label_flipped"].numpy() & ~out_flag & ~wrong
    return {"teacher_right": ~out_flag & ~wrong & ~flipped, "teacher_wrong": wrong, "label_flipped": flipped,
            "outlier": out_flag}


def alpha_stats(alpha: np.ndarray, train: TensorIndexedDataset) -> Dict[str, float]:
    """Mean α per :func:`sample_groups` group (``alpha_<group>``; the teacher-wrong mean is NaN if empty, other
    empty groups are left out)."""
    groups = sample_groups(train)
    stats = {"alpha_teacher_wrong": float(alpha[groups["teacher_wrong"]].mean()) if groups["teacher_wrong"].any()
             else float("nan"), "alpha_teacher_right": float(alpha[groups["teacher_right"]].mean())}
    for name in ("outlier", "label_flipped"):
        if groups[name].any():
            stats[f"alpha_{name}"] = float(alpha[groups[name]].mean())
    return stats


def run_seed(task_name: str, cfg: Dict, seed: int) -> Dict:
    task = BUILDERS[task_name](cfg, seed)
    res: Dict = {"seed": seed, "teacher": task.teacher_metric,
                 "ce": train_fixed_rule(task, cfg, seed, rule_loss("ce", cfg["temperature"])),
                 "wls": train_fixed_rule(task, cfg, seed, rule_loss("wls", cfg["temperature"]))}
    for rule, make_loss in reference_losses(cfg).items():
        res[f"kd_{rule}"] = {str(a): train_fixed_rule(task, cfg, seed, make_loss(a)) for a in cfg[GRIDS[rule]]}
    if not cfg["run_tgeo"]:
        return res
    full = train_tgeo(task, cfg, seed)
    res["tgeo"] = full["metric"]
    res.update(alpha_stats(full["alpha"], task.train))
    for name in cfg["ablations"]:
        res[f"tgeo_{name}"] = train_tgeo(task, cfg, seed, name)["metric"]
    hist = full["history"]
    res["_plot"] = {"alpha": full["alpha"], "groups": sample_groups(task.train),
                    "epoch": hist["epoch"], "weight": hist["weight"], "index": hist["index"]}
    return res


def summarise(task_name: str, cfg: Dict, per_seed: List[Dict]) -> Dict:
    ms = mean_and_se
    out: Dict = {"task": task_name, "metric_name": "auc" if task_name == "ctr" else "accuracy",
                 "seeds": [r["seed"] for r in per_seed], "se": {}}
    learned = ["tgeo"] + [f"tgeo_{a}" for a in cfg["ablations"]] if cfg["run_tgeo"] else []
    keys = ["teacher", "ce", "kd_fixed_best", "wls"] + learned
    for rule, grid in GRIDS.items():
        if not cfg[grid]:
            continue
        best = max(cfg[grid], key=lambda a: np.mean([r[f"kd_{rule}"][str(a)] for r in per_seed]))
        for r in per_seed:  # the grid value with the best mean test metric: an oracle choice
            r[f"kd_{rule}_best"] = r[f"kd_{rule}"][str(best)]
        out[f"kd_{rule}_best_alpha"] = best
        out[f"kd_{rule}"] = {str(a): ms([r[f"kd_{rule}"][str(a)] for r in per_seed])[0] for a in cfg[grid]}
        keys += [f"kd_{rule}_best"] if rule != "fixed" else []
    for k in keys:
        out[k], out["se"][k] = ms([r[k] for r in per_seed])
    pairs = [(m, k) for m in learned[:1] for k in ("ce", "kd_fixed_best", "wls", "kd_oracle_best", *learned[1:])]
    pairs += [("kd_oracle_best", k) for k in ("kd_fixed_best", "wls")]
    out["paired"] = {f"{m}-{k}": ms([r[m] - r[k] for r in per_seed]) for m, k in pairs if k in per_seed[0]
                     and m in per_seed[0]}
    out["ablations"] = {a: out[f"tgeo_{a}"] for a in cfg["ablations"]} if cfg["run_tgeo"] else {}
    for k in ("alpha_teacher_wrong", "alpha_teacher_right", "alpha_outlier", "alpha_label_flipped"):
        if k in per_seed[0]:
            out[k], out["se"][k] = ms([r[k] for r in per_seed])
    out["per_seed"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in per_seed]
    return out


def save_alpha_plot(task_name: str, per_seed: List[Dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("teacher_right", "tab:blue"), ("teacher_wrong", "tab:red"), ("outlier", "tab:orange"),
              ("label_flipped", "tab:green")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    p = per_seed[0]["_plot"]
    masks = {k: m[p["index"]] for k, m in p["groups"].items()}
    epochs = np.unique(p["epoch"])
    for name, color in groups:
        m = masks[name]
        if m.any():
            ax1.plot(epochs + 1, [p["weight"][m & (p["epoch"] == e)].mean() for e in epochs], color=color,
                     label=name.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean α used in training")
    ax1.set_title(f"seed {per_seed[0]['seed']}: α during training")
    ax1.legend()
    alpha = np.concatenate([r["_plot"]["alpha"] for r in per_seed])
    final = {name: np.concatenate([r["_plot"]["groups"][name] for r in per_seed]) for name, _ in groups}
    bins = np.linspace(0, 1, 41)
    for name, color in groups:
        if final[name].any():
            ax2.hist(alpha[final[name]], bins=bins, alpha=0.55, color=color, density=True,
                     label=f"{name.replace('_', ' ')} ({final[name].sum()})")
    ax2.set_xlabel("final α (weight on the teacher term)")
    ax2.set_ylabel("density")
    ax2.set_title(f"TGeo-KD on the {task_name} task, all seeds")
    ax2.legend()
    save_png(fig, path, dpi=100)


def report_signal(task_name: str, cfg: Dict, seeds: List[int], epochs: List[int], out: Optional[str]) -> Dict:
    """:func:`alpha_signal` after each of ``epochs`` epochs, per seed; prints and returns group means over seeds."""
    per_seed = []
    for seed in seeds:
        task = BUILDERS[task_name](cfg, seed)
        per_seed.append({str(e): alpha_signal(task, cfg, seed, e) for e in epochs})
    summary = {str(e): {g: {k: float(np.mean([r[str(e)][g][k] for r in per_seed])) for k in ("mean", "frac_positive")}
                        for g in per_seed[0][str(e)]} for e in epochs}
    for e, groups in summary.items():
        print(f"after {e} epochs: " + "; ".join(f"{g} g {v['mean']:+.3f} ({v['frac_positive']:.2f} > 0)"
                                                 for g, v in groups.items()))
    result = {"task": task_name, "seeds": seeds, "alpha_signal": summary, "per_seed": per_seed, "config": cfg}
    write_json(out, result)
    return result


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, help="which task (or `task:` in the config)")
    add_config_args(p, quick="small sizes and few epochs (smoke tests)")
    p.add_argument("--plot", help="write the α plot PNG here")
    p.add_argument("--workers", type=int, default=1, help="run seeds in this many processes")
    p.add_argument("--signal", type=int, nargs="+", metavar="EPOCHS",
                   help="instead of training the methods, report the one-step meta signal on α by sample group "
                        "after these many epochs of WLS-KD (alpha_signal)")
    args = p.parse_args(argv)
    task_name = args.task
    if task_name is None and args.config:
        import yaml
        task_name = (yaml.safe_load(Path(args.config).read_text()) or {}).get("task")
    if task_name not in TASKS:
        p.error(f"give --task one of {TASKS} (or a config with `task:`)")
    cfg = config_from_args(args, DEFAULTS[task_name], QUICK[task_name])
    if cfg["task"] != task_name:
        raise ValueError(f"--task {task_name} disagrees with the config's task {cfg['task']!r}")
    seeds = list(cfg.get("seeds") or [0])
    torch.set_num_threads(1)
    if args.signal:
        return report_signal(task_name, cfg, seeds, args.signal, args.out)
    per_seed: List[Dict] = []
    if args.workers > 1:  # one process per seed (each single-threaded)
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            runs = pool.map(run_seed, [task_name] * len(seeds), [cfg] * len(seeds), seeds)
    else:
        runs = (run_seed(task_name, cfg, s) for s in seeds)
    for s, res in zip(seeds, runs):  # the JSON is rewritten after every seed, so a long run leaves partial results
        per_seed.append(res)
        row = {k: v for k, v in res.items() if isinstance(v, float)}
        print(f"seed {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
        result = summarise(task_name, cfg, per_seed)
        write_json(args.out, {**result, "config": cfg})
    ms = lambda k: mean_sd([r[k] for r in per_seed])  # noqa: E731
    rows = [("teacher", ms("teacher")), ("CE only", ms("ce")),
            (f"KD, best fixed α = {result['kd_fixed_best_alpha']}", ms("kd_fixed_best")), ("WLS-KD", ms("wls"))]
    if cfg["agree_alphas"]:
        rows.append((f"KD where the teacher agrees, best α = {result['kd_agree_best_alpha']}", ms("kd_agree_best")))
    if cfg["oracle_alphas"]:
        rows.append((f"two-flag oracle α, best α = {result['kd_oracle_best_alpha']}", ms("kd_oracle_best")))
    if cfg["run_tgeo"]:
        rows += [("TGeo-KD (bilevel)", ms("tgeo"))] + [(f"TGeo-KD, {a}", ms(f"tgeo_{a}")) for a in cfg["ablations"]]
    print(f"\n{task_name}: test {result['metric_name']} (mean ± sd over seeds {seeds})")
    print(table(rows, ["method", result["metric_name"]]))
    print("α: " + ", ".join(f"{k} {result[k]:.3f}" for k in ("alpha_teacher_right", "alpha_teacher_wrong",
                                                              "alpha_outlier", "alpha_label_flipped") if k in result))
    print("paired: " + ", ".join(f"{k} {m:+.4f} ± {se:.4f}" for k, (m, se) in result["paired"].items()))
    if args.plot and cfg["run_tgeo"]:
        save_alpha_plot(task_name, per_seed, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
