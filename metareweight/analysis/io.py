"""Load what a run wrote: ``metrics.jsonl`` (one row per step and per epoch) and ``weights.npz`` (the weight history).

:class:`~metareweight.MetaTrainer` writes both files when given ``log_dir``.

Example:
    >>> import tempfile, torch
    >>> from metareweight import JsonlLogger, WeightHistory
    >>> d = tempfile.mkdtemp()
    >>> h = WeightHistory(); h.record(0, 0, torch.tensor([0, 1]), torch.tensor([0.5, 1.5])); h.save(f"{d}/weights.npz")
    >>> JsonlLogger(f"{d}/metrics.jsonl").on_epoch_end(None, {"epoch": 0, "meta_loss": 0.7})
    >>> run = load_run(d)
    >>> run.series("meta_loss")
    (array([0.]), array([0.7]))
    >>> run.history.latest()["weight"].tolist()
    [0.5, 1.5]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..callbacks import read_jsonl
from ..history import WeightHistory

METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "weights.npz"


@dataclass
class Run:
    """A run's logged metrics rows and weight history (``None`` where the run wrote no ``weights.npz``)."""

    path: Path
    rows: List[Dict]
    history: Optional[WeightHistory]

    def events(self, event: str) -> List[Dict]:
        """The rows of one kind: ``"step"`` or ``"epoch"``."""
        return [r for r in self.rows if r.get("event") == event]

    def series(self, key: str, event: str = "epoch", x: str = "epoch") -> Tuple[np.ndarray, np.ndarray]:
        """``(x, value)`` arrays of metric ``key`` over the rows of ``event`` that have it (``None`` reads as nan)."""
        rows = [r for r in self.events(event) if key in r]
        if not rows:
            known = sorted({k for r in self.events(event) for k in r})
            raise KeyError(f"no {event!r} row has metric {key!r}; logged metrics: {known}")
        xs = np.array([r[x] for r in rows], dtype=np.float64)
        ys = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)
        return xs, ys


def load_run(path: Union[str, Path]) -> Run:
    """Read ``path/metrics.jsonl`` and ``path/weights.npz``; at least one of them must exist."""
    path = Path(path)
    metrics, weights = path / METRICS_FILE, path / WEIGHTS_FILE
    if not metrics.exists() and not weights.exists():
        raise FileNotFoundError(f"{path} holds neither {METRICS_FILE} nor {WEIGHTS_FILE}; pass the log_dir "
                                "given to MetaTrainer")
    rows = read_jsonl(metrics) if metrics.exists() else []
    history = WeightHistory.load(weights) if weights.exists() else None
    return Run(path=path, rows=rows, history=history)


def as_history(source: Union[Run, WeightHistory]) -> WeightHistory:
    """The weight history of a :class:`Run` or a :class:`~metareweight.WeightHistory` itself."""
    if isinstance(source, WeightHistory):
        return source
    if isinstance(source, Run):
        if source.history is None:
            raise ValueError(f"the run in {source.path} has no {WEIGHTS_FILE}")
        return source.history
    raise TypeError(f"expected a WeightHistory or a Run from load_run, got {type(source).__name__}")
