"""Sensitivity of Meta-Weight-Net to model lr × meta lr × epochs × meta-set size on small noisy datasets.

    python -m experiments.sensitivity --quick                     # smoke run (two tiny datasets, one seed)
    python -m experiments.sensitivity --out results/sensitivity.json
    metareweight run configs/sensitivity.yaml phases=[confirm]    # = --config configs/sensitivity.yaml --set ...

Every cell trains the README's model (one hidden layer of ``hidden`` units, SGD with momentum 0.9, batch 64, no
weight decay) on a training split with ``noise`` symmetric label noise, a clean meta set of ``meta_per_class``
samples per class and a clean test set (25 %), with :class:`~metareweight.MetaWeightNet` and ``hypergrad="fast"``.
The meta learning rate is either a fixed number (``meta_lrs``) or the rule ``meta_lr = budget / meta steps``
(``budgets``: Adam moves the weight net by about ``meta_lr`` per step, so this fixes the total distance; the study
rejects it). Beside each cell, three baselines on the same
split and seed: plain training on the noisy set, training on the clean meta set alone (as many optimizer steps as
plain), and plain training on train + meta set.

Phases (``phases``): ``grid`` (lr × meta lr × epochs on the design datasets and design seeds), ``size`` (meta-set
size), ``confirm`` (the README's settings and its old ones, ``confirm_settings``, on fresh seeds, on the design
datasets and on held-out datasets never looked at while choosing). A confirm setting is ``[model lr, meta lr]`` or
``[model lr, meta lr, "train"]`` for ``MetaWeightNet(meta_class_prior="train")`` (``configs/sensitivity_prior.yaml``).
Each row also has ``auroc_within`` (the weight AUROC within each given label, averaged) and ``advice``
(:func:`~metareweight.objectives.mwnet.weight_advice`).
Inputs are standardised with the training split's mean and sd. Datasets that need a package or file that is not
installed are skipped with the reason printed.

Output JSON: ``rows`` (one per cell and seed) and ``skipped`` ({dataset: reason}).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.common import add_config_args, config_from_args, table, train_plain, write_json
from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset
from metareweight.data.datasets import NoisySplit, split_with_noise
from metareweight.objectives.mwnet import weight_advice

FULL = dict(
    phases=["grid", "size", "confirm"],
    datasets=["digits", "breast_cancer", "rotten_tomatoes", "fashion_mnist"],   # design: the rule is chosen here
    holdout=["wine", "phishing", "womens_department"],                       # never seen while choosing
    noise=0.3, hidden=256, batch_size=64, momentum=0.9, max_samples=2000,
    lrs=[0.01, 0.1], meta_lrs=[1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2], budgets=[0.3], epochs=[10, 50],
    meta_per_class=10,
    size_meta_per_class=[3, 30], size_budgets=[], size_meta_lrs=[1.0e-3], size_lr=0.01, size_epochs=30,
    # (model lr, meta lr) pairs: the README's example (lr 0.01, MetaWeightNet's default 1e-3) and its old settings
    confirm_settings=[[0.01, 1.0e-3], [0.1, 1.0e-4]], confirm_epochs=30,
    seeds=[0, 1], confirm_seeds=[2, 3, 4],
)
QUICK = dict(FULL, phases=["grid", "size", "confirm"], datasets=["wine"], holdout=["iris"], lrs=[0.1],
             meta_lrs=[1.0e-4], budgets=[0.3], epochs=[5], size_meta_per_class=[3], size_epochs=5, seeds=[0],
             confirm_seeds=[1], confirm_epochs=5)


# ---- datasets: (x float32 (n, d), y int64 (n,)) -------------------------------------------------------------------
def _sklearn(name: str) -> Callable[[], Tuple[np.ndarray, np.ndarray]]:
    def load():
        from sklearn import datasets
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
        return x.astype(np.float32), y.astype(np.int64)
    return load


def _fashion_mnist():
    from metareweight.data.datasets import load_fashion_mnist
    x, y, _, _ = load_fashion_mnist()
    return x.reshape(len(x), -1).astype(np.float32) / 255.0, y


def _rotten_tomatoes():
    from metareweight.data.text import embed, load_rotten_tomatoes
    texts, y = load_rotten_tomatoes()
    keep = np.random.default_rng(0).permutation(len(texts))[:FULL["max_samples"]]
    return embed([texts[i] for i in keep]), y[keep]


def _womens_department():
    from metareweight.data.text import embed, load_womens_reviews
    df = load_womens_reviews()
    df = df[df.department != "Trend"].reset_index(drop=True)   # 119 reviews: too few for a 10-per-class meta set
    keep = np.random.default_rng(0).permutation(len(df))[:FULL["max_samples"]]
    df = df.iloc[keep]
    return embed(df.text.tolist()), df.department_id.to_numpy(np.int64)


def _womens_rating():
    """Women's reviews, the star rating (1–5; 55 % five stars): the same reviews as ``womens_department``."""
    from metareweight.data.text import embed, load_womens_reviews
    df = load_womens_reviews()
    df = df[df.department != "Trend"].reset_index(drop=True)
    df = df.iloc[np.random.default_rng(0).permutation(len(df))[:FULL["max_samples"]]]
    return embed(df.text.tolist()), df.rating.to_numpy(np.int64)


def _phishing():
    from metareweight.data.tabular import load_phishing
    return load_phishing()


LOADERS: Dict[str, Callable[[], Tuple[np.ndarray, np.ndarray]]] = {
    "digits": _sklearn("digits"), "breast_cancer": _sklearn("breast_cancer"), "wine": _sklearn("wine"),
    "iris": _sklearn("iris"), "fashion_mnist": _fashion_mnist, "rotten_tomatoes": _rotten_tomatoes,
    "womens_department": _womens_department, "womens_rating": _womens_rating, "phishing": _phishing,
}
KINDS = {"digits": "8×8 images", "breast_cancer": "tabular", "wine": "tabular", "iris": "tabular",
         "fashion_mnist": "28×28 images", "rotten_tomatoes": "text (WordLlama)",
         "womens_department": "text (WordLlama)", "womens_rating": "text (WordLlama)", "phishing": "tabular"}


def load_dataset(name: str, max_samples: int) -> Tuple[np.ndarray, np.ndarray]:
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(LOADERS)}")
    x, y = LOADERS[name]()
    if len(x) > max_samples:  # a fixed stratified-enough subset: the same for every seed
        keep = np.sort(np.random.default_rng(0).permutation(len(x))[:max_samples])
        x, y = x[keep], y[keep]
    _, y = np.unique(y, return_inverse=True)
    return np.asarray(x, np.float32), y.astype(np.int64)


def standardise(s: NoisySplit) -> NoisySplit:
    """Centre and scale each feature by the training split's mean and sd. The sd is floored at a tenth of the median
    feature's: a (near-)constant training column (a digits corner pixel) would otherwise blow a rare non-zero value
    in the meta or test set up to thousands."""
    mu, sd = s.x_train.mean(0), s.x_train.std(0)
    sd = sd.clamp_min(max(0.1 * float(sd.median()), 1e-6))
    s.x_train, s.x_meta, s.x_test = ((t - mu) / sd for t in (s.x_train, s.x_meta, s.x_test))
    return s


# ---- training -----------------------------------------------------------------------------------------------------
def model_for(split: NoisySplit, hidden: int, lr: float, momentum: float, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(split.x_train.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, split.num_classes))
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train_steps(model, opt, x, y, steps: int, batch_size: int, seed: int) -> None:
    """``steps`` SGD steps of mean cross-entropy on shuffled batches of (x, y), cycling over epochs."""
    g = torch.Generator().manual_seed(seed)
    batches: List[Tuple[torch.Tensor, torch.Tensor]] = []
    while len(batches) < steps:
        batches += [(x[idx], y[idx]) for idx in torch.randperm(len(x), generator=g).split(batch_size)]
    train_plain(model, opt, batches[:steps], 1)


def baselines(split: NoisySplit, cfg: Dict, lr: float, epochs: int, seed: int) -> Dict[str, float]:
    """Plain on the noisy set, the clean meta set alone and train + meta, each for the same number of steps."""
    bs = cfg["batch_size"]
    steps = epochs * -(-len(split.x_train) // bs)
    out = {}
    sets = {"plain": (split.x_train, split.y_train), "meta_only": (split.x_meta, split.y_meta),
            "train_plus_meta": (torch.cat([split.x_train, split.x_meta]), torch.cat([split.y_train, split.y_meta]))}
    for name, (x, y) in sets.items():
        model, opt = model_for(split, cfg["hidden"], lr, cfg["momentum"], seed)
        train_steps(model, opt, x, y, steps, bs, seed)
        out[f"acc_{name}"] = accuracy(model, split.x_test, split.y_test)
    return out


def run_mwnet(split: NoisySplit, cfg: Dict, lr: float, epochs: int, seed: int, meta_lr: Optional[float],
              budget: Optional[float], prior: Optional[str] = None) -> Dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorIndexedDataset(split.x_train, split.y_train), batch_size=cfg["batch_size"],
                       shuffle=True, generator=g)
    meta = DataLoader(TensorIndexedDataset(split.x_meta, split.y_meta), batch_size=cfg["batch_size"], shuffle=True,
                      generator=g)
    meta_steps = epochs * len(train)
    if meta_lr is None:  # the tested (and rejected) "total distance" rule: meta_lr × meta steps = budget
        meta_lr = budget / meta_steps
    model, opt = model_for(split, cfg["hidden"], lr, cfg["momentum"], seed)
    torch.manual_seed(seed)
    objective = MetaWeightNet(meta_lr=meta_lr, meta_class_prior=prior)
    trainer = MetaTrainer(model, opt, train, objective=objective, meta_loader=meta, hypergrad="fast",
                          noisy=split.noisy.numpy(), progress=False, health=False)  # rows carry the advice
    trainer.fit(epochs=epochs)
    last = trainer.history[-1]
    latest = trainer.weights_history.latest(epoch=trainer.epoch - 1)
    w, index = latest["weight"], latest["index"]
    flags = split.noisy.numpy()[index]
    return {"meta_lr": float(meta_lr), "meta_steps": meta_steps, "acc_mwnet": accuracy(model, split.x_test, split.y_test),
            "weight_auroc": float(last["weight_auroc"]), "w_clean": float(last["weight_clean"]),
            "w_noisy": float(last["weight_noisy"]), "w_std": float(w.std()),
            "gap": float((last["weight_clean"] - last["weight_noisy"]) / max(float(w.mean()), 1e-12)),
            "spread": float(w.std() / max(float(w.mean()), 1e-12)),
            "auroc_within": within_class_auroc(w, flags, split.y_train.numpy()[index]),
            "advice": weight_advice(w, flags, meta_lr, split.y_train.numpy()[index], prior),
            "saturated": float(((w < 0.02) | (w > 0.98)).mean())}


def within_class_auroc(w: np.ndarray, noisy: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the (given, possibly flipped) labels of the weight AUROC of clean against flipped samples within
    that label: a class re-balancing shifts whole classes and moves the overall AUROC, not this one."""
    from metareweight.metrics import auroc
    aucs = [auroc(w[labels == c], ~noisy[labels == c]) for c in np.unique(labels)
            if noisy[labels == c].any() and (~noisy[labels == c]).any()]
    return float(np.mean(aucs)) if aucs else float("nan")


class Study:
    """Runs cells, caching data splits and baselines; collects one row per (cell, seed)."""

    def __init__(self, cfg: Dict):
        self.cfg = cfg
        self.rows: List[Dict] = []
        self.skipped: Dict[str, str] = {}
        self._data: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self._base: Dict[Tuple, Dict[str, float]] = {}

    def available(self, names: List[str]) -> List[str]:
        out = []
        for name in names:
            if name in self.skipped:
                continue
            if name not in self._data:
                try:
                    self._data[name] = load_dataset(name, self.cfg["max_samples"])
                except Exception as e:  # noqa: BLE001 - a missing data package skips that dataset, with its reason
                    self.skipped[name] = f"{type(e).__name__}: {e}".split("\n")[0]
                    print(f"skipping {name}: {self.skipped[name]}", flush=True)
                    continue
            out.append(name)
        return out

    def split(self, name: str, seed: int, meta_per_class: int) -> NoisySplit:
        x, y = self._data[name]
        return standardise(split_with_noise(x, y, noise=self.cfg["noise"], meta_per_class=meta_per_class, seed=seed))

    def cell(self, phase: str, name: str, seed: int, lr: float, epochs: int, meta_per_class: int,
             meta_lr: Optional[float] = None, budget: Optional[float] = None, prior: Optional[str] = None) -> Dict:
        split = self.split(name, seed, meta_per_class)
        key = (name, seed, lr, epochs, meta_per_class)
        if key not in self._base:
            self._base[key] = baselines(split, self.cfg, lr, epochs, seed)
        t0 = time.perf_counter()
        row = {"phase": phase, "dataset": name, "seed": seed, "lr": lr, "epochs": epochs,
               "meta_per_class": meta_per_class, "setting": f"fixed {meta_lr:g}" if budget is None else
               f"rule {budget:g}/T", "n_train": len(split.x_train), **self._base[key],
               **run_mwnet(split, self.cfg, lr, epochs, seed, meta_lr, budget, prior)}
        if prior:
            row["setting"] += f" prior={prior}"
        row["gain"] = row["acc_mwnet"] - row["acc_plain"]
        row["seconds"] = time.perf_counter() - t0
        self.rows.append(row)
        print(f"{phase:7s} {name:17s} s{seed} lr={lr:g} ep={epochs:3d} m={meta_per_class:2d} {row['setting']:12s} "
              f"meta_lr={row['meta_lr']:.2e} plain={row['acc_plain']:.3f} mwnet={row['acc_mwnet']:.3f} "
              f"auroc={row['weight_auroc']:.3f} gap={row['gap']:+.2f} sat={row['saturated']:.2f} ({row['seconds']:.1f}s)", flush=True)
        return row

    def settings(self) -> List[Tuple[Optional[float], Optional[float]]]:
        return [(v, None) for v in self.cfg["meta_lrs"]] + [(None, b) for b in self.cfg["budgets"]]

    def grid(self) -> None:
        c = self.cfg
        for name in self.available(c["datasets"]):
            for seed in c["seeds"]:
                for lr in c["lrs"]:
                    for epochs in c["epochs"]:
                        for meta_lr, budget in self.settings():
                            self.cell("grid", name, seed, lr, epochs, c["meta_per_class"], meta_lr, budget)

    def size(self) -> None:
        c = self.cfg
        for name in self.available(c["datasets"]):
            for seed in c["seeds"]:
                for m in c["size_meta_per_class"]:
                    for meta_lr in c["size_meta_lrs"]:
                        self.cell("size", name, seed, c["size_lr"], c["size_epochs"], m, meta_lr=meta_lr)
                    for budget in c["size_budgets"]:
                        self.cell("size", name, seed, c["size_lr"], c["size_epochs"], m, budget=budget)

    def confirm(self) -> None:
        c = self.cfg
        for name in self.available(c["datasets"] + c["holdout"]):
            for seed in c["confirm_seeds"]:
                for lr, meta_lr, *prior in c["confirm_settings"]:  # [lr, meta lr] or [lr, meta lr, class prior]
                    self.cell("confirm", name, seed, lr, c["confirm_epochs"], c["meta_per_class"], meta_lr=meta_lr,
                              prior=prior[0] if prior else None)


# ---- summaries ----------------------------------------------------------------------------------------------------
GROUP = ("phase", "dataset", "lr", "epochs", "meta_per_class", "setting")


def summarise(rows: List[Dict]) -> List[Dict]:
    """Means over seeds of each (phase, dataset, lr, epochs, meta set size, setting)."""
    groups: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
    out = []
    for key, rs in groups.items():
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("acc_plain", "acc_meta_only", "acc_train_plus_meta",
                                                                 "acc_mwnet", "gain", "weight_auroc", "gap", "saturated",
                                                                 "meta_lr", "auroc_within")}
        mean["min_auroc"] = float(min(r["weight_auroc"] for r in rs))
        mean["wins"] = f"{sum(r['gain'] > 0 for r in rs)}/{len(rs)}"
        out.append({**dict(zip(GROUP, key)), **mean})
    return out


def render(summary: List[Dict], phase: str) -> str:
    rows = [(s["dataset"], f"{s['lr']:g}", s["epochs"], s["meta_per_class"], s["setting"], f"{s['meta_lr']:.1e}",
             f"{s['acc_plain']:.3f}", f"{s['acc_meta_only']:.3f}", f"{s['acc_train_plus_meta']:.3f}",
             f"{s['acc_mwnet']:.3f}", f"{100 * s['gain']:+.1f} ({s['wins']})",
             f"{s['weight_auroc']:.3f} (min {s['min_auroc']:.2f})", f"{s['auroc_within']:.3f}", f"{s['gap']:+.2f}",
             f"{s['saturated']:.2f}")
            for s in summary if s["phase"] == phase]
    return table(rows, ["dataset", "lr", "epochs", "meta/class", "meta lr", "= value", "plain", "meta only",
                        "train+meta", "MW-Net", "gain, pts (wins)", "weight AUROC", "within class", "gap",
                        "saturated"])


def by_setting(summary: List[Dict], phase: str = "grid") -> str:
    """Each meta-lr setting across every dataset, lr and epochs of a phase: worst and mean AUROC and gain."""
    settings: Dict[str, List[Dict]] = {}
    for s in summary:
        if s["phase"] == phase:
            settings.setdefault(s["setting"], []).append(s)
    rows = []
    for name, ss in settings.items():
        rows.append((name, len(ss), f"{np.mean([s['weight_auroc'] for s in ss]):.3f}",
                     f"{min(s['min_auroc'] for s in ss):.2f}",
                     f"{sum(s['weight_auroc'] >= 0.9 for s in ss)}/{len(ss)}",
                     f"{100 * np.mean([s['gain'] for s in ss]):+.1f}", f"{sum(s['gain'] > 0 for s in ss)}/{len(ss)}",
                     f"{np.mean([s['gap'] for s in ss]):+.2f}", f"{np.mean([s['saturated'] for s in ss]):.2f}"))
    return table(rows, ["meta lr", "cells", "mean AUROC", "worst seed AUROC", "cells AUROC ≥ 0.9", "mean gain, pts",
                        "cells with gain > 0", "gap", "saturated"])


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, quick="a tiny run for smoke tests")
    args = p.parse_args(argv)
    cfg = config_from_args(args, FULL, QUICK)
    cfg.pop("experiment", None)
    unknown = [d for d in cfg["datasets"] + cfg["holdout"] if d not in LOADERS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {sorted(LOADERS)}")
    bad = [ph for ph in cfg["phases"] if ph not in ("grid", "size", "confirm")]
    if bad:
        p.error(f"unknown phase(s) {bad}; choose from grid, size, confirm")
    torch.set_num_threads(1)
    study = Study(cfg)
    for phase in cfg["phases"]:
        getattr(study, phase)()
    summary = summarise(study.rows)
    for phase in [ph for ph in cfg["phases"] if any(s["phase"] == ph for s in summary)]:
        print(f"\n{phase}: means over seeds ({cfg['noise']:.0%} symmetric noise)")
        print(render(summary, phase))
        if phase in ("grid", "confirm"):
            print(f"\n{phase}, by meta-lr setting")
            print(by_setting(summary, phase))
    for name, reason in study.skipped.items():
        print(f"skipped {name}: {reason}")
    result = {"rows": study.rows, "summary": summary, "skipped": study.skipped, "config": cfg}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
