"""Learning to Reweight (L2RW) beside Meta-Weight-Net and plain training on digits with 40% symmetric label noise.

    python -m experiments.l2rw --quick                      # one seed, 3 epochs (smoke test)
    python -m experiments.l2rw --out results/l2rw.json      # seeds 0-2 (configs/l2rw.yaml)
    metareweight run configs/l2rw.yaml epochs=5

The data, model, optimizer and loaders are those of ``experiments/mwnet.py`` (its ``run_seed`` gives the plain and
Meta-Weight-Net numbers); L2RW trains the same model from the same initialisation with
``MetaTrainer(objective=LearningToReweight())``: per-example ε = 0 for each batch, weights from the clipped negative
hypergradient on a clean meta batch (the 100-sample meta set of ``noisy_digits``).

Output JSON keys: acc_plain, acc_mwnet, acc_l2rw, weight_auroc_mwnet, weight_auroc_l2rw, zero_weight_l2rw (the
fraction of last-epoch weights that are exactly 0) as means over seeds, and per_seed.
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader

from experiments import mwnet
from experiments.common import (accuracy, add_config_args, config_from_args, mean_sd, mlp, seed_everything, table,
                                write_json)
from metareweight import LearningToReweight, MetaTrainer, TensorIndexedDataset, auroc, available_methods
from metareweight.data.datasets import noisy_digits

FULL = dict(mwnet.FULL, epochs=20, hypergrad="fast")
QUICK = dict(FULL, epochs=3)
KEYS = ("acc_plain", "acc_mwnet", "acc_l2rw", "weight_auroc_mwnet", "weight_auroc_l2rw", "zero_weight_l2rw")


def run_l2rw(seed: int, cfg: Dict) -> Dict:
    """L2RW on the data, model, optimizer and loaders of :func:`experiments.mwnet.run_seed`."""
    data = noisy_digits(noise=cfg["noise"], seed=seed)
    train = TensorIndexedDataset(data.x_train, data.y_train, noisy=data.noisy)
    meta = TensorIndexedDataset(data.x_meta, data.y_meta)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=cfg["batch_size"], shuffle=True, generator=g)
    meta_loader = DataLoader(meta, batch_size=cfg["batch_size"], shuffle=True, generator=g)
    seed_everything(seed)
    model = mlp(64, cfg["hidden"], data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=5e-4)
    trainer = MetaTrainer(model, opt, train_loader, objective=LearningToReweight(), meta_loader=meta_loader,
                          hypergrad=cfg["hypergrad"], adam_preconditioner="fixed", noisy=data.noisy.numpy(),
                          progress=False)
    trainer.fit(epochs=cfg["epochs"])
    last = trainer.weights_history.latest(epoch=trainer.epoch - 1)
    flags = data.noisy.numpy()[last["index"]]
    return {"acc_l2rw": accuracy(model, data.x_test, data.y_test), "weight_auroc_l2rw": auroc(last["weight"], ~flags),
            "zero_weight_l2rw": float((last["weight"] == 0).mean())}


def run_seed(seed: int, cfg: Dict) -> Dict:
    base = mwnet.run_seed(seed, cfg)
    return {"seed": seed, "acc_plain": base["acc_plain"], "acc_mwnet": base["acc_meta"],
            "weight_auroc_mwnet": base["weight_auroc"], **run_l2rw(seed, cfg)}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds, else 0")
    p.add_argument("--hypergrad", choices=available_methods())
    add_config_args(p, quick="one seed, 3 epochs (smoke test)")
    args = p.parse_args(argv)
    cfg = config_from_args(args, QUICK if args.quick else FULL)
    seeds = args.seeds or ([0] if args.quick else cfg.pop("seeds", [0, 1, 2]))
    cfg.pop("seeds", None)
    cfg.pop("experiment", None)
    if args.hypergrad is not None:
        cfg["hypergrad"] = args.hypergrad
    torch.set_num_threads(1)
    per_seed: List[Dict] = [run_seed(s, cfg) for s in seeds]
    result = {k: float(np.mean([r[k] for r in per_seed])) for k in KEYS}
    result["per_seed"] = per_seed
    rows = [("plain training", mean_sd([r["acc_plain"] for r in per_seed]), "–"),
            ("Meta-Weight-Net", mean_sd([r["acc_mwnet"] for r in per_seed]), mean_sd([r["weight_auroc_mwnet"]
                                                                                       for r in per_seed])),
            ("L2RW", mean_sd([r["acc_l2rw"] for r in per_seed]), mean_sd([r["weight_auroc_l2rw"] for r in per_seed]))]
    print(f"\ndigits, {int(cfg['noise'] * 100)}% symmetric label noise, {cfg['epochs']} epochs, hypergrad "
          f"{cfg['hypergrad']}, seeds {seeds}")
    print(table(rows, ["method", "test accuracy", "weight AUROC (clean vs flipped)"]))
    write_json(args.out, {**result, "config": cfg})
    return result


if __name__ == "__main__":
    main()
