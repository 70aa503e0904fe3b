"""Classic reweighting benchmarks on Fashion-MNIST: 40% symmetric noise, 40% pair-flip noise, long tail (IF 100).

Methods: plain cross-entropy; Meta-Weight-Net (clean, class-balanced meta set of ``meta_per_class`` per class); the
two baselines that also use that clean meta set: ``meta_only`` (plain training on the meta set alone, cycled so that
it takes as many SGD steps per epoch as plain training) and ``plain_plus_meta`` (plain training on train + meta set);
the self-taught rescaler (STORM: meta batches from the noisy train set, no clean data); and the simple baselines of
:mod:`metareweight.baselines`: inverse-frequency class weights, random oversampling, focal loss, logit adjustment
and small-loss selection (co-teaching-style keep ratio, forget rate ``forget_rate``). Every method gets the same
model initialisation, optimizer, epochs and batch order for a seed; test accuracy is taken after the last epoch (no
early stopping on test data). The Fashion-MNIST test set is class-balanced, so on the long tail it is the balanced
accuracy.

    metareweight run configs/classic.yaml -- --out results/classic_cnn.json     # small CNN, seeds 0-2 (RESULTS.md)
    metareweight run configs/classic_mlp.yaml -- --out results/classic.json     # the MLP table
    metareweight run configs/classic_lt_long.yaml -- --out results/classic_cnn_lt_long.json   # lt100, 60 epochs
    metareweight run configs/classic_lt_val.yaml meta_lr=3e-3   # lt100 choices: design seeds, validation split
    python -m experiments.classic --config configs/classic.yaml --set settings=[lt100] seeds=[3,4]
    python -m experiments.classic --quick                                   # minutes, one seed
    python -m experiments.classic --from-json a.json b.json --plot docs/img/classic.png   # merge runs, no training

Output JSON: ``config``, ``per_seed`` (setting, method, seed, test_acc, train_acc on the observed labels, seconds[,
weight_auroc, val_acc]), ``failures`` (runs that raised; reported, not fatal) and ``summary`` (setting → method →
mean/sd of test accuracy).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from experiments.common import (accuracy, add_config_args, config_from_args, mean_and_sd, mean_sd, save_png,
                                sd, seed_everything, table, train_plain, write_json)
from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset, auroc
from metareweight import baselines as B
from metareweight.config import ConfigError
from metareweight.data import long_tailed_indices, pair_noise, symmetric_noise
from metareweight.data.datasets import load_fashion_mnist

SETTINGS = {  # name → (noise function, noise rate, imbalance factor)
    "sym40": (symmetric_noise, 0.4, 1.0),
    "pair40": (pair_noise, 0.4, 1.0),
    "lt100": (None, 0.0, 100.0),
}
META_OPTIMIZERS = ("adam", "sgd")  # Meta-Weight-Net's: its noisy-label code's Adam, its long-tail code's SGD
METHODS = ["plain", "class_weight", "oversample", "focal", "logit_adjust", "small_loss", "mwnet", "self_taught",
           "meta_only", "plain_plus_meta"]
LABELS = {"plain": "plain CE", "class_weight": "inverse-frequency class weights", "oversample": "random oversampling",
          "meta_only": "clean meta set alone", "plain_plus_meta": "plain CE on train + meta set",
          "focal": "focal loss", "logit_adjust": "logit adjustment", "small_loss": "small-loss selection",
          "mwnet": "Meta-Weight-Net", "self_taught": "self-taught rescaler (STORM)"}

FULL = dict(settings=list(SETTINGS), methods=list(METHODS), seeds=[0, 1, 2], train_per_class=500, meta_per_class=10,
            val_per_class=0, test_size=10000, model="cnn", epochs=15, batch_size=100, lr=0.05, lr_milestones=[10],
            lr_decay=0.1, momentum=0.9, weight_decay=5e-4, hypergrad="fast", meta_lr=1e-3, mwnet_hidden=100,
            mwnet_normalize=True, mwnet_meta_optimizer="adam",
            storm_hypergrad="unrolled", storm_passes=3, storm_bn_scope="batch", storm_input_dropout=0.1,
            storm_meta_lr=1e-2, focal_gamma=2.0, la_tau=1.0, forget_rate=0.4, forget_warmup=5)
QUICK = dict(FULL, seeds=[0], train_per_class=200, test_size=2000, epochs=6, lr_milestones=[4])
NUM_CLASSES = 10


@dataclass
class Task:
    """One setting and seed: normalised image tensors, observed train labels and the corruption flags."""

    x_train: Tensor
    y_train: Tensor
    y_train_clean: Tensor
    noisy: Tensor
    x_meta: Tensor
    y_meta: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Optional[Tensor] = None
    y_val: Optional[Tensor] = None


def make_task(setting: str, seed: int, cfg: Dict, arrays) -> Task:
    """Stratified subsample of ``train_per_class`` per class (long-tailed for ``lt*``), noise on train only, a
    disjoint clean class-balanced meta set of ``meta_per_class`` per class and, if ``val_per_class`` > 0, a clean
    class-balanced validation set from training images outside both (for choosing settings; the test set never is).
    The train, meta and test splits do not depend on ``val_per_class``."""
    noise_fn, rate, imbalance = SETTINGS[setting]
    xtr, ytr, xte, yte = arrays
    rng = np.random.default_rng(seed)
    train_idx, meta_idx, val_idx = [], [], []
    used = cfg["meta_per_class"] + cfg["train_per_class"]
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(ytr == c))
        meta_idx.append(idx[:cfg["meta_per_class"]])
        train_idx.append(idx[cfg["meta_per_class"]:used])
        val_idx.append(idx[used:used + cfg["val_per_class"]])
    train_idx, val_idx = np.concatenate(train_idx), np.concatenate(val_idx)
    if imbalance > 1:
        train_idx = train_idx[long_tailed_indices(ytr[train_idx], imbalance, seed=seed)]
    train_idx, meta_idx = rng.permutation(train_idx), np.concatenate(meta_idx)
    y = y_clean = ytr[train_idx]
    flipped = np.zeros(len(y), bool)
    if noise_fn is not None:
        y, flipped = noise_fn(y, rate, NUM_CLASSES, seed=seed + 1)
    test_idx = rng.permutation(len(yte))[:cfg["test_size"]]

    def img(a):  # uint8 (N, 28, 28) → standardised float (N, 1, 28, 28)
        return ((torch.as_tensor(a, dtype=torch.float32) / 255.0 - 0.286) / 0.353).unsqueeze(1)

    lab = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    val = (img(xtr[val_idx]), lab(ytr[val_idx])) if len(val_idx) else (None, None)
    return Task(img(xtr[train_idx]), lab(y), lab(y_clean), torch.as_tensor(flipped), img(xtr[meta_idx]),
                lab(ytr[meta_idx]), img(xte[test_idx]), lab(yte[test_idx]), *val)


def make_model(kind: str) -> nn.Module:
    """``cnn``: LeNet-style, conv 1→8 5×5 + max-pool, conv 8→16 5×5 + max-pool, linear 256→10 (6k parameters);
    ``mlp``: 784-256-256-10 (270k parameters)."""
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 5), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, NUM_CLASSES))
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, NUM_CLASSES))
    raise ValueError(f"config key 'model' must be 'cnn' or 'mlp', got {kind!r}")


LossFn = Callable[[Tensor, Tensor, int], Tensor]  # (logits, targets, epoch) → scalar loss


def baseline_loss(method: str, task: Task, cfg: Dict) -> LossFn:
    """The training loss of a fixed (not meta-learned) method, from the observed train labels."""
    ce = nn.functional.cross_entropy
    if method in ("plain", "oversample", "meta_only", "plain_plus_meta"):
        return lambda z, y, e: ce(z, y)
    if method == "class_weight":
        w = B.class_weights(task.y_train, NUM_CLASSES)
        return lambda z, y, e: (w[y] * ce(z, y, reduction="none")).mean()
    if method == "focal":
        return lambda z, y, e: B.focal_loss(z, y, gamma=cfg["focal_gamma"]).mean()
    if method == "logit_adjust":
        prior = B.class_counts(task.y_train, NUM_CLASSES).float()
        prior = prior / prior.sum()
        return lambda z, y, e: B.logit_adjusted_loss(z, y, prior, tau=cfg["la_tau"]).mean()
    if method == "small_loss":
        def select(z, y, e):
            losses = ce(z, y, reduction="none")
            keep = B.keep_ratio_schedule(e, cfg["forget_rate"], cfg["forget_warmup"])
            return losses[B.small_loss_mask(losses, keep)].mean()
        return select
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def lr_phases(cfg: Dict) -> List[tuple]:
    """``[(first_epoch, end_epoch, lr), ...]``: step decay by ``lr_decay`` at each of ``lr_milestones``."""
    edges = [0, *[m for m in sorted(cfg["lr_milestones"]) if 0 < m < cfg["epochs"]], cfg["epochs"]]
    return [(a, b, cfg["lr"] * cfg["lr_decay"] ** i) for i, (a, b) in enumerate(zip(edges, edges[1:]))]


def run_method(method: str, task: Task, cfg: Dict, seed: int) -> Dict:
    """Train a fresh model (same init per seed) with ``method``; returns test accuracy, time and weight AUROC."""
    seed_everything(seed)
    model = make_model(cfg["model"])
    scale = 1.0 / cfg["batch_size"] if method == "self_taught" else 1.0  # STORM's inner loss is a sum, not a mean
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"] * scale, momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    train = TensorIndexedDataset(task.x_train, task.y_train, noisy=task.noisy)
    g = torch.Generator().manual_seed(seed)
    if method == "oversample":
        sampler = B.balanced_sampler(task.y_train, NUM_CLASSES, generator=g)
        loader = DataLoader(train, batch_size=cfg["batch_size"], sampler=sampler, drop_last=True)
    elif method == "meta_only":  # as many steps per epoch as plain training, cycling the meta set
        meta = TensorIndexedDataset(task.x_meta, task.y_meta)
        batch = min(cfg["batch_size"], len(meta))
        steps = len(train) // cfg["batch_size"]
        loader = DataLoader(meta, batch_size=batch, drop_last=True,
                            sampler=RandomSampler(meta, num_samples=max(steps, 1) * batch, generator=g))
    elif method == "plain_plus_meta":
        both = TensorIndexedDataset(torch.cat([task.x_train, task.x_meta]), torch.cat([task.y_train, task.y_meta]))
        loader = DataLoader(both, batch_size=cfg["batch_size"], shuffle=True, generator=g, drop_last=True)
    else:
        loader = DataLoader(train, batch_size=cfg["batch_size"], shuffle=True, generator=g, drop_last=True)
    if len(loader) == 0:
        raise ConfigError(f"batch_size {cfg['batch_size']} exceeds the {len(train)} training samples")
    out: Dict = {}
    start = time.perf_counter()
    trainer: Optional[MetaTrainer] = None
    loss_fn = None if method in ("mwnet", "self_taught") else baseline_loss(method, task, cfg)
    for first, end, lr in lr_phases(cfg):
        for group in opt.param_groups:
            group["lr"] = lr * scale
        if loss_fn is None:
            # a new trainer per phase re-reads the learning rate for its virtual steps; φ and its optimizer carry on
            trainer = meta_trainer(method, model, opt, loader, task, cfg, seed, trainer)
            trainer.fit(epochs=end - first)
            continue
        train_plain(model, opt, loader, end - first, first_epoch=first,
                    loss=lambda m, b, epoch: loss_fn(m(b.inputs), b.targets, epoch))
    if trainer is not None:
        last = trainer.weights_history.latest(epoch=trainer.epoch - 1)
        flags = task.noisy.numpy()[last["index"]]
        if flags.any():
            out["weight_auroc"] = auroc(last["weight"], ~flags)
    out.update(seconds=time.perf_counter() - start, test_acc=accuracy(model, task.x_test, task.y_test),
               train_acc=accuracy(model, task.x_train, task.y_train))  # on the observed (possibly noisy) labels
    if task.x_val is not None:
        out["val_acc"] = accuracy(model, task.x_val, task.y_val)
    return out


def meta_trainer(method: str, model: nn.Module, opt, loader: DataLoader, task: Task, cfg: Dict, seed: int,
                 previous: Optional[MetaTrainer] = None) -> MetaTrainer:
    """A MetaTrainer for ``mwnet`` or ``self_taught``; continues ``previous``'s objective and meta optimizer."""
    hypergrad = cfg["hypergrad"] if method == "mwnet" else cfg["storm_hypergrad"]
    common = dict(hypergrad=hypergrad, noisy=task.noisy.numpy(), progress=False)
    if previous is not None:
        common.update(meta_optimizer=previous.meta_optimizer)
    if method == "mwnet":
        meta = TensorIndexedDataset(task.x_meta, task.y_meta)
        meta_loader = DataLoader(meta, batch_size=min(cfg["batch_size"], len(meta)), shuffle=True,
                                 generator=torch.Generator().manual_seed(seed + 1))
        objective = previous.objective if previous else MetaWeightNet(hidden=cfg["mwnet_hidden"],
                                                                      normalize=cfg["mwnet_normalize"],
                                                                      meta_lr=cfg["meta_lr"])
        if previous is None and cfg["mwnet_meta_optimizer"] == "sgd":  # the original long-tail code's choice
            common.update(meta_optimizer=torch.optim.SGD(objective.meta_parameters(), lr=cfg["meta_lr"],
                                                         momentum=cfg["momentum"], nesterov=True,
                                                         weight_decay=cfg["weight_decay"]))
        return MetaTrainer(model, opt, loader, objective=objective, meta_loader=meta_loader, **common)
    if previous is not None:
        objective = previous.objective
    else:
        try:
            from metareweight.objectives.self_taught import SelfTaughtRescaler
        except ImportError as e:  # pragma: no cover - depends on the checkout
            raise RuntimeError(f"method 'self_taught' needs metareweight.objectives.self_taught ({e})") from None
        objective = SelfTaughtRescaler(NUM_CLASSES, passes=cfg["storm_passes"], bn_scope=cfg["storm_bn_scope"],
                                       input_dropout=cfg["storm_input_dropout"], meta_lr=cfg["storm_meta_lr"])
    return MetaTrainer(model, opt, loader, objective=objective, real_step="lookahead", **common)


def summarise(per_seed: List[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for r in per_seed:
        out.setdefault(r["setting"], {}).setdefault(r["method"], {"acc": []})["acc"].append(r["test_acc"])
    return {s: {m: {"mean": float(np.mean(v["acc"])), "sd": sd(v["acc"]), "n": len(v["acc"])} for m, v in ms.items()}
            for s, ms in out.items()}


def results_table(per_seed: List[Dict], cfg: Dict) -> str:
    """Markdown table: one row per method, one column per setting, mean ± sd test accuracy over seeds."""
    settings = [s for s in cfg["settings"] if any(r["setting"] == s for r in per_seed)]
    rows = []
    for m in cfg["methods"]:
        row = [LABELS[m]]
        for s in settings:
            accs = [r["test_acc"] for r in per_seed if r["setting"] == s and r["method"] == m]
            row.append(mean_sd(accs) if accs else "–")
        secs = [r["seconds"] for r in per_seed if r["method"] == m]
        row.append(f"{np.mean(secs):.0f}" if secs else "–")
        rows.append(row)
    return table(rows, ["method", *settings, "s / run"])


def paired_gains(per_seed: List[Dict], method: str = "mwnet", reference: str = "plain") -> str:
    """Per setting, ``method`` − ``reference`` test accuracy paired by seed (same data, init, batch order):
    mean ± sd in points and the number of seeds where ``method`` is ahead."""
    acc = {(r["setting"], r["method"], r["seed"]): r["test_acc"] for r in per_seed}
    parts = []
    for setting in dict.fromkeys(r["setting"] for r in per_seed):
        d = [100 * (acc[(setting, method, s)] - a) for (st, m, s), a in acc.items()
             if st == setting and m == reference and (setting, method, s) in acc]
        if d:
            mean, spread = mean_and_sd(d)
            parts.append(f"{setting} {mean:+.1f} ± {spread:.1f} ({sum(x > 0 for x in d)}/{len(d)} seeds)")
    return f"{LABELS[method]} − {LABELS[reference]}, paired by seed, points: " + "; ".join(parts) if parts else ""


def merge_results(paths: List[str], replace: bool = False) -> Dict:
    """Several runs' JSON (e.g. extra seeds for one setting, or one method run apart) as one result: the first
    run's config with every run's seeds, settings and methods. With ``replace``, a later file's row replaces an
    earlier one for the same setting, method and seed (a re-run); otherwise every row is kept."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    per_seed = [r for run in runs for r in run["per_seed"]]
    if replace:
        per_seed = list({(r["setting"], r["method"], r["seed"]): r for r in per_seed}.values())
    present = lambda key, order: [v for v in order if any(r[key] == v for r in per_seed)]  # noqa: E731
    config = dict(runs[0]["config"], seeds=sorted({r["seed"] for r in per_seed}),
                  settings=present("setting", SETTINGS), methods=present("method", METHODS))
    return {"config": config, "per_seed": per_seed, "failures": [f for run in runs for f in run.get("failures", [])],
            "summary": summarise(per_seed)}


def save_plot(per_seed: List[Dict], cfg: Dict, path: Path) -> None:
    """Grouped bars: mean test accuracy per method in each setting, with the seeds' standard deviation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(per_seed)
    settings = [s for s in cfg["settings"] if s in summary]
    methods = [m for m in cfg["methods"] if any(m in summary[s] for s in settings)]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        stats = [summary[s].get(m, {"mean": np.nan, "sd": 0.0}) for s in settings]
        ax.bar(np.arange(len(settings)) + (i - (len(methods) - 1) / 2) * width, [st["mean"] for st in stats], width,
               yerr=[st["sd"] for st in stats], label=LABELS[m], capsize=2)
    ax.set_xticks(np.arange(len(settings)), [f"{s} ({max(v['n'] for v in summary[s].values())} seeds)"
                                             for s in settings])
    lo = min(summary[s][m]["mean"] for s in settings for m in methods if m in summary[s])
    ax.set_ylim(max(0.0, lo - 0.08), None)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Fashion-MNIST, {cfg['model'].upper()}, test accuracy after {cfg['epochs']} epochs (mean ± sd)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_png(fig, path)


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", help="write a bar chart PNG here")
    p.add_argument("--from-json", metavar="FILE", nargs="+",
                   help="print the table (and --plot, --out) of finished runs, merged; no training")
    p.add_argument("--replace", action="store_true",
                   help="with --from-json: a later file's run replaces an earlier one with the same setting, method "
                        "and seed")
    add_config_args(p, quick="small subset, fewer epochs, one seed")
    args = p.parse_args(argv)
    cfg = config_from_args(args, FULL, QUICK)
    if cfg["mwnet_meta_optimizer"] not in META_OPTIMIZERS:
        raise ConfigError(f"config key 'mwnet_meta_optimizer': unknown {cfg['mwnet_meta_optimizer']!r}; choose from "
                          f"{list(META_OPTIMIZERS)}")
    for key, allowed in (("settings", SETTINGS), ("methods", METHODS)):
        bad = [v for v in cfg[key] if v not in allowed]
        if bad:
            raise ConfigError(f"config key {key!r}: unknown {bad}; choose from {list(allowed)}")
    if args.from_json:
        result = merge_results(args.from_json, replace=args.replace)
        print(results_table(result["per_seed"], result["config"]))
        print(paired_gains(result["per_seed"]))
        write_json(args.out, result)
        if args.plot:
            save_plot(result["per_seed"], result["config"], Path(args.plot))
        return result
    torch.set_num_threads(1)
    arrays = load_fashion_mnist()
    per_seed: List[Dict] = []
    failures: List[Dict] = []
    for seed in cfg["seeds"]:  # seed-major, so an interrupted run still covers every setting
        for setting in cfg["settings"]:
            task = make_task(setting, seed, cfg, arrays)
            for method in cfg["methods"]:
                r = {"setting": setting, "method": method, "seed": seed}
                try:
                    r.update(run_method(method, task, cfg, seed))
                except (ValueError, RuntimeError) as e:  # one failing method must not lose the others' results
                    print(f"{setting:7s} seed {seed} {method:13s} FAILED: {type(e).__name__}: {e}", flush=True)
                    failures.append({**r, "error": f"{type(e).__name__}: {e}"})
                    continue
                per_seed.append(r)
                print(f"{setting:7s} seed {seed} {method:13s} acc {r['test_acc']:.4f} ({r['seconds']:.0f} s)",
                      flush=True)
                write_json(args.out, {"config": cfg, "per_seed": per_seed, "failures": failures,
                                      "summary": summarise(per_seed)})
    print(f"\nFashion-MNIST, {cfg['model']}, {cfg['train_per_class']} train/class (before the long-tail cut), "
          f"{cfg['meta_per_class']} meta/class, {cfg['epochs']} epochs, seeds {cfg['seeds']}")
    print(results_table(per_seed, cfg))
    print(paired_gains(per_seed))
    for f in failures:
        print(f"FAILED {f['setting']} seed {f['seed']} {f['method']}: {f['error']}")
    result = {"config": cfg, "per_seed": per_seed, "failures": failures, "summary": summarise(per_seed)}
    write_json(args.out, result)
    if args.plot:
        save_plot(per_seed, cfg, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
