"""The one harness of the experiment scripts: plain training, evaluation, seeding, statistics over seeds (mean ± sd /
se, Spearman), JSON output, tables and config arguments (``--config``, ``--set``, ``--quick``, ``--out``).

Every script runs from the repository root as ``python -m experiments.NAME`` or through ``metareweight run``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from metareweight.data import Batch, as_batch


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


def train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, epochs: int, *,
                loss: Optional[Callable[[nn.Module, Batch, int], torch.Tensor]] = None,
                sample_weight: Optional[torch.Tensor] = None, scheduler=None, first_epoch: int = 0,
                evaluate: Optional[Callable[[nn.Module], float]] = None, progress: bool = False) -> List[float]:
    """Ordinary training, the floor every method is compared with: for each epoch ``first_epoch ..
    first_epoch + epochs - 1``, one optimizer step per batch on ``loss(model, batch, epoch)`` (default: the mean
    cross-entropy, each sample's term times ``sample_weight[batch.index]`` if given), then ``scheduler.step()`` and
    ``evaluate(model)``. Returns the ``evaluate`` values, one per epoch (empty without ``evaluate``).

    Example:
        >>> x, y = torch.randn(32, 4), torch.arange(32) % 2
        >>> model = torch.nn.Linear(4, 2)
        >>> curve = train_plain(model, torch.optim.SGD(model.parameters(), lr=0.1), [(x, y)], 3,
        ...                     evaluate=lambda m: accuracy(m, x, y))
        >>> len(curve)
        3
    """
    if loss is None:
        loss = _weighted_cross_entropy(sample_weight)
    elif sample_weight is not None:
        raise ValueError("give either loss or sample_weight (the default loss's per-sample weights), not both")
    epoch_range = range(first_epoch, first_epoch + epochs)
    if progress:
        from tqdm.auto import tqdm
        epoch_range = tqdm(epoch_range, desc="plain", leave=False)
    curve = []
    for epoch in epoch_range:
        for raw in loader:
            value = loss(model, as_batch(raw), epoch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if evaluate is not None:
            curve.append(evaluate(model))
    return curve


def _weighted_cross_entropy(sample_weight: Optional[torch.Tensor]):
    def loss(model: nn.Module, b: Batch, epoch: int) -> torch.Tensor:
        losses = nn.functional.cross_entropy(model(b.inputs), b.targets, reduction="none")
        if sample_weight is not None:
            losses = losses * sample_weight[b.index]
        return losses.mean()
    return loss


# ---- statistics over seeds --------------------------------------------------------------------------------------
def sd(values: Sequence[float]) -> float:
    """The sample standard deviation (``ddof=1``); 0.0 for a single value."""
    v = np.asarray(values, float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def se(values: Sequence[float]) -> float:
    """The standard error of the mean, ``sd / sqrt(n)``; 0.0 for a single value.

    Example:
        >>> se([1.0, 2.0, 3.0, 4.0])
        0.6454972243679028
    """
    v = np.asarray(values, float)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def mean_and_sd(values: Sequence[float]) -> Tuple[float, float]:
    return float(np.mean(values)), sd(values)


def mean_and_se(values: Sequence[float]) -> Tuple[float, float]:
    return float(np.mean(np.asarray(values, float))), se(values)


def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± sd"`` for a table.

    Example:
        >>> mean_sd([0.5, 0.7])
        '0.600 ± 0.141'
    """
    m, s = mean_and_sd(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def mean_se(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± se"`` for a table."""
    m, s = mean_and_se(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties).

    Example:
        >>> round(spearman([1, 2, 3, 4], [10, 30, 20, 40]), 6)
        0.8
    """
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


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


def add_config_args(parser: argparse.ArgumentParser, quick: str = "a short run for smoke tests",
                    out: str = "write the results JSON here") -> None:
    """The arguments every script shares: ``--config FILE`` and ``--set KEY=VALUE ...`` (what ``metareweight run``
    passes a script), ``--quick`` and ``--out FILE``.

    ``--set a=1 b=2`` and ``--set a=1 --set b=2`` both work; later overrides win.
    """
    parser.add_argument("--config", metavar="FILE", help="YAML config (flat keys; see configs/)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set epochs=5 seeds=[0,1]")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", metavar="FILE", help=out)


def config_from_args(args: argparse.Namespace, defaults: Dict, quick: Optional[Dict] = None) -> Dict:
    """The validated config of a script that called :func:`add_config_args`: ``defaults``, with ``quick`` over them
    when ``--quick`` was given, then ``--config``, then ``--set``."""
    if args.quick and quick:
        defaults = {**defaults, **quick}
    return load_config(args.config, defaults, args.overrides)
