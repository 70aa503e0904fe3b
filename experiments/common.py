"""Pieces shared by the experiment scripts: plain training, evaluation, seeding, JSON output, tables."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight.data import as_batch


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def mlp(d_in: int, hidden: int, classes: int, depth: int = 2, dropout: float = 0.0) -> nn.Sequential:
    layers: List[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int,
                sample_weight: Optional[torch.Tensor] = None, progress: bool = False) -> None:
    """Ordinary (optionally fixed-weighted) cross-entropy training: the floor every method is compared with."""
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="plain", leave=False)
    for _ in it:
        for raw in loader:
            b = as_batch(raw)
            losses = nn.functional.cross_entropy(model(b.inputs), b.targets, reduction="none")
            if sample_weight is not None:
                losses = losses * sample_weight[b.index]
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()


def save_png(fig, path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it as a PNG (parents created) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_json(path: Optional[str], payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))


def mean_sd(values: Sequence[float]) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def table(rows: Iterable[Sequence[str]], header: Sequence[str]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def load_config(path: Optional[str], defaults: Dict, overrides: Sequence[str] = ()) -> Dict:
    """A flat YAML config merged over ``defaults``: unknown keys and wrong types are errors naming the key.

    ``overrides`` are ``key=value`` strings (values parsed as YAML), applied last. Keys ``experiment`` and
    ``seeds`` (a list of ints) are allowed besides the defaults' keys. Types come from the defaults' values
    (``None`` allows anything; ints are accepted for floats). Validation is :mod:`metareweight.config`'s; the
    result is a plain dict with the defaults' keys plus any ``experiment``/``seeds`` given. Keys that are
    :class:`~metareweight.config.TrainerConfig` settings (``hypergrad``, ``meta_interval``, ...) are checked
    against it too, so ``hypergrad=unroled`` fails before training with a did-you-mean.
    """
    from metareweight.config import (ConfigError, TrainerConfig, load, parse_overrides, read_yaml,
                                     schema_from_defaults, to_dict)

    cfg = to_dict(load(schema_from_defaults(defaults), path, overrides))
    try:
        TrainerConfig.pick(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    given = set(read_yaml(path)) if path else set()
    given |= {key for _, key, _ in parse_overrides(overrides)}
    return {k: cfg[k] for k in [*defaults, *sorted(given - set(defaults))]}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE ...``: the arguments ``metareweight run`` passes a script.

    ``--set a=1 b=2`` and ``--set a=1 --set b=2`` both work; later overrides win.
    """
    parser.add_argument("--config", metavar="FILE", help="YAML config (flat keys; see configs/)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set epochs=5 seeds=[0,1]")


def config_from_args(args: argparse.Namespace, defaults: Dict) -> Dict:
    """The validated config of a script that called :func:`add_config_args` (``--config`` then ``--set``)."""
    return load_config(args.config, defaults, args.overrides)
