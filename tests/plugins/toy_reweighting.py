"""A tiny metareweight plugin: a user's own objective, hypergradient method and experiment, selected by name.

From this folder (the current directory is on the plugin path; ``tests/test_plugins.py`` runs exactly this)::

    metareweight run --plugin toy_reweighting toy.yaml epochs=2

or put ``plugins: [toy_reweighting]`` in the YAML (``toy_with_key.yaml``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset, Unrolled
from metareweight.config import load, schema_from_defaults
from metareweight.plugins import make_objective

EXPERIMENT = "toy_reweighting"  # the experiment's name (default: the module's last dotted component)


class FlooredWeightNet(MetaWeightNet):
    """Meta-Weight-Net whose raw weights never fall below ``floor`` (no sample is ever dropped entirely)."""

    def __init__(self, floor: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.floor = floor

    def weight(self, losses: Tensor) -> Tensor:
        return self.floor + (1 - self.floor) * super().weight(losses)


@dataclass
class ClippedUnrolled(Unrolled):
    """The exact unrolled hypergradient, its norm clipped to ``max_norm``."""

    name = "toy_clipped_unrolled"
    max_norm: float = 1.0

    def __call__(self, problem):
        result = Unrolled.__call__(self, problem)
        norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in result.grads))
        scale = min(1.0, self.max_norm / max(float(norm), 1e-12))
        result.grads = [g * scale for g in result.grads]
        result.stats["hypergrad_norm"] = float(norm)
        return result


DEFAULTS = dict(objective="FlooredWeightNet", hypergrad="toy_clipped_unrolled", epochs=2, n=96, meta_lr=1.0e-3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = load(schema_from_defaults(DEFAULTS), args.config, args.overrides)
    torch.manual_seed(cfg.seeds[0])
    x, y = torch.randn(cfg.n, 5), torch.randint(0, 3, (cfg.n,))
    model = torch.nn.Linear(5, 3)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          DataLoader(TensorIndexedDataset(x, y), batch_size=32),
                          objective=make_objective(cfg.objective, meta_lr=cfg.meta_lr, hidden=8),
                          meta_loader=DataLoader(TensorIndexedDataset(x, y), batch_size=32),
                          hypergrad=cfg.hypergrad, progress=False)
    history = trainer.fit(epochs=cfg.epochs)
    result = {"objective": type(trainer.objective).__name__, "hypergrad": trainer.method.name,
              "epochs": len(history), "min_weight": float(trainer.weights_history.arrays()["weight"].min()),
              "hypergrad_norm": history[-1]["hypergrad_norm"]}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh)
    return result
