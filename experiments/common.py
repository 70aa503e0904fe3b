"""Pieces shared by the experiment scripts: plain training, evaluation, seeding, JSON output, tables."""

from __future__ import annotations

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
    ``seeds`` are allowed besides the defaults' keys.
    """
    import yaml

    cfg = dict(defaults)
    raw: Dict = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config must be a mapping of keys to values")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        raw[k.strip()] = yaml.safe_load(v)
    allowed = set(defaults) | {"experiment", "seeds"}
    for key, value in raw.items():
        if key not in allowed:
            import difflib
            hint = difflib.get_close_matches(key, allowed, n=1)
            raise ValueError(f"unknown config key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; valid keys: {sorted(allowed)}")
        if key in defaults and defaults[key] is not None and value is not None:
            want = type(defaults[key])
            ok = isinstance(value, want) or (want is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok or (want is int and isinstance(value, bool)):
                raise ValueError(f"config key {key!r} must be {want.__name__}, got {type(value).__name__} ({value!r})")
            if want is float:
                value = float(value)
        cfg[key] = value
    return cfg
