"""Meta-Weight-Net vs plain training on scikit-learn's digits with symmetric label noise.

    python experiments/mwnet.py --demo                 # the `make demo` run: table + weight histogram PNG
    python experiments/mwnet.py --quick --out r.json   # a fast smoke configuration
    python experiments/mwnet.py --seeds 0 1 2 --out results/mwnet.json
    metareweight run configs/mwnet.yaml epochs=10     # = --config configs/mwnet.yaml --set epochs=10

Output JSON keys: acc_plain, acc_meta, mean_w_clean, mean_w_noisy, weight_auroc (means over seeds) and per_seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (accuracy, save_png, add_config_args, config_from_args, mean_sd, mlp, seed_everything,  # noqa: E402
                                table, train_plain, write_json)
from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset, auroc, available_methods  # noqa: E402
from metareweight.data.datasets import noisy_digits  # noqa: E402

FULL = dict(noise=0.4, epochs=40, hidden=256, batch_size=64, lr=0.1, momentum=0.9, meta_lr=1e-4, hypergrad="unrolled")
QUICK = dict(FULL, epochs=20)


def run_seed(seed: int, cfg: Dict, progress: bool = False, log_dir: Optional[str] = None) -> Dict:
    data = noisy_digits(noise=cfg["noise"], seed=seed)
    train = TensorIndexedDataset(data.x_train, data.y_train, noisy=data.noisy)
    meta = TensorIndexedDataset(data.x_meta, data.y_meta)

    def loaders():
        g = torch.Generator().manual_seed(seed)
        return (DataLoader(train, batch_size=cfg["batch_size"], shuffle=True, generator=g),
                DataLoader(meta, batch_size=cfg["batch_size"], shuffle=True, generator=g))

    def fresh_model():
        seed_everything(seed)
        model = mlp(64, cfg["hidden"], data.num_classes)
        return model, torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=5e-4)

    model, opt = fresh_model()
    train_plain(model, opt, loaders()[0], cfg["epochs"], progress=progress)
    acc_plain = accuracy(model, data.x_test, data.y_test)

    model, opt = fresh_model()
    train_loader, meta_loader = loaders()
    trainer = MetaTrainer(model, opt, train_loader, objective=MetaWeightNet(meta_lr=cfg["meta_lr"]),
                          meta_loader=meta_loader, hypergrad=cfg["hypergrad"], noisy=data.noisy.numpy(),
                          progress=progress, log_dir=log_dir)
    trainer.fit(epochs=cfg["epochs"])
    acc_meta = accuracy(model, data.x_test, data.y_test)
    last = trainer.weights_history.latest(epoch=trainer.epoch - 1)
    flags = data.noisy.numpy()[last["index"]]
    return {"seed": seed, "acc_plain": acc_plain, "acc_meta": acc_meta,
            "mean_w_clean": float(last["weight"][~flags].mean()), "mean_w_noisy": float(last["weight"][flags].mean()),
            "weight_auroc": auroc(last["weight"], ~flags), "weights": last["weight"].tolist(),
            "noisy": flags.tolist()}


def summarise(per_seed: List[Dict]) -> Dict:
    keys = ("acc_plain", "acc_meta", "mean_w_clean", "mean_w_noisy", "weight_auroc")
    out = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
    out["per_seed"] = [{k: r[k] for k in ("seed",) + keys} for r in per_seed]
    return out


def save_histogram(result: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, noisy = np.asarray(result["weights"]), np.asarray(result["noisy"], bool)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(w.min(), w.max(), 40)
    ax.hist(w[~noisy], bins=bins, alpha=0.6, label=f"clean ({(~noisy).sum()})", color="tab:blue")
    ax.hist(w[noisy], bins=bins, alpha=0.6, label=f"flipped ({noisy.sum()})", color="tab:red")
    ax.set_xlabel("learned weight (last epoch)")
    ax.set_ylabel("samples")
    ax.set_title(f"Meta-Weight-Net on digits, 40% flipped labels (AUROC {result['weight_auroc']:.2f})")
    ax.legend()
    save_png(fig, path)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run for smoke tests")
    p.add_argument("--demo", action="store_true", help="the make-demo run: progress bars, table and PNG")
    p.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds, else 0")
    p.add_argument("--epochs", type=int)
    p.add_argument("--hypergrad", choices=available_methods())
    p.add_argument("--out", help="write results JSON here")
    p.add_argument("--plot", default=None, help="write the weight histogram PNG here")
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args, QUICK if args.quick else FULL)
    seeds = cfg.pop("seeds", [0])
    args.seeds = args.seeds or seeds
    cfg.pop("experiment", None)
    for key in ("epochs", "hypergrad"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    per_seed = [run_seed(s, cfg, progress=args.demo) for s in args.seeds]
    result = summarise(per_seed)
    rows = [("plain training", mean_sd([r["acc_plain"] for r in per_seed]), "–", "–", "–"),
            ("Meta-Weight-Net", mean_sd([r["acc_meta"] for r in per_seed]),
             f"{result['mean_w_clean']:.3f}", f"{result['mean_w_noisy']:.3f}", f"{result['weight_auroc']:.3f}")]
    print(f"\ndigits, {int(cfg['noise'] * 100)}% symmetric label noise, {cfg['epochs']} epochs, seeds {args.seeds}")
    print(table(rows, ["method", "test accuracy", "mean w (clean)", "mean w (flipped)", "weight AUROC"]))
    plot = args.plot or ("results/mwnet_weights.png" if args.demo else None)
    if plot:
        save_histogram(per_seed[0], Path(plot))
        print(f"weight histogram: {plot}")
    write_json(args.out, {**result, "config": cfg})
    return result


if __name__ == "__main__":
    main()
