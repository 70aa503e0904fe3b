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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..callbacks import read_jsonl
from ..history import CORE_COLUMNS, WeightHistory

METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "weights.npz"


@dataclass
class Run:
    """A run's logged metrics rows and weight history (``None`` where the run wrote no ``weights.npz``).

    ``flags`` are per-sample arrays indexed by dataset index (such as the ``noisy=`` flags given to the trainer),
    served as extra weight-history columns: ``load_run(d, noisy=flags)`` then ``group_stats(run, "noisy")``.
    """

    path: Path
    rows: List[Dict]
    history: Optional[WeightHistory]
    flags: Dict[str, np.ndarray] = field(default_factory=dict)

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


def load_run(path: Union[str, Path], **flags) -> Run:
    """Read ``path/metrics.jsonl`` and ``path/weights.npz``; at least one of them must exist.

    ``flags`` (e.g. ``noisy=flipped``) are per-sample arrays indexed by dataset index, added as weight-history
    columns; one of the same name as a column the trainer wrote replaces it. A trainer given ``noisy=`` writes that
    column itself (see :class:`Run`)."""
    path = Path(path)
    metrics, weights = path / METRICS_FILE, path / WEIGHTS_FILE
    if not metrics.exists() and not weights.exists():
        raise FileNotFoundError(f"{path} holds neither {METRICS_FILE} nor {WEIGHTS_FILE}; pass the log_dir "
                                "given to MetaTrainer")
    rows = read_jsonl(metrics) if metrics.exists() else []
    history = WeightHistory.load(weights) if weights.exists() else None
    return Run(path=path, rows=rows, history=history,
               flags={k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in flags.items()})


def _flag_column(name: str, values: np.ndarray, index: np.ndarray) -> np.ndarray:
    if values.ndim != 1:
        raise ValueError(f"flag {name!r} must be one value per sample (1-d), got shape {values.shape}")
    if len(index) and (index.min() < 0 or index.max() >= len(values)):
        raise ValueError(f"flag {name!r} has {len(values)} entries but the weight history holds sample indices "
                         f"{index.min()}..{index.max()}; pass one entry per dataset sample (the trainer's noisy=)")
    return values[index]


def as_arrays(source: Union[Run, WeightHistory, Mapping[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The weight-history columns (``step``, ``epoch``, ``index``, ``weight``, groups) of a :class:`Run`, a
    :class:`~metareweight.WeightHistory`, or a mapping of equal-length arrays such as ``history.arrays()``."""
    if isinstance(source, WeightHistory):
        return source.arrays()
    if isinstance(source, Run):
        if source.history is None:
            raise ValueError(f"the run in {source.path} has no {WEIGHTS_FILE}")
        a = source.history.arrays()
        if source.flags:
            a = {**a, **{k: _flag_column(k, v, a["index"]) for k, v in source.flags.items()}}
        return a
    if isinstance(source, Mapping):
        a = {k: np.asarray(v) for k, v in source.items()}
        missing = [c for c in CORE_COLUMNS if c not in a]
        if missing:
            raise ValueError(f"weight-history arrays need columns {list(CORE_COLUMNS)}; missing {missing}")
        if len({len(v) for v in a.values()}) != 1:
            raise ValueError("weight-history arrays must all have the same length")
        return a
    raise TypeError("expected a WeightHistory, a Run from load_run or a dict of history arrays, "
                    f"got {type(source).__name__}")
