"""Statistics of learned weights: by group over time, ROC against a known flag, trajectories, binned means.

Each function takes a *source*: a :class:`~metareweight.WeightHistory`, a :class:`~metareweight.analysis.Run` or a
dict of history arrays (``history.arrays()``). A *group* is any integer/bool column of the weight history
(``noisy``, ``target``, ``domain``, ``source``, ...) or an array indexed by sample index (e.g. a noise mask the
history does not carry).

Example:
    >>> import torch
    >>> from metareweight import WeightHistory
    >>> h = WeightHistory()
    >>> h.record(0, 0, torch.tensor([0, 1, 2, 3]), torch.tensor([1., 1., 1., 1.]), noisy=torch.tensor([0, 0, 1, 1]))
    >>> h.record(1, 1, torch.tensor([0, 1, 2, 3]), torch.tensor([2., 1., 0., .5]), noisy=torch.tensor([0, 0, 1, 1]))
    >>> s = group_stats(h, "noisy")
    >>> s.mean.tolist()
    [[1.0, 1.0], [1.5, 0.25]]
    >>> weight_roc(h, "noisy", positive=0).auc
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..metrics import auroc
from .io import Run, as_arrays

if TYPE_CHECKING:
    from ..history import WeightHistory

Source = Union[Run, "WeightHistory", Dict[str, np.ndarray]]
Groups = Union[str, Sequence, np.ndarray]
PERIODS = ("epoch", "step")


def _column(a: Dict[str, np.ndarray], by: Groups) -> np.ndarray:
    if isinstance(by, str):
        if by not in a:
            raise KeyError(f"the weight history has no column {by!r}; columns: {sorted(a)}. Pass per-sample flags "
                           f"indexed by dataset index instead: load_run(log_dir, {by}=flags), or the array itself "
                           "in place of the column name")
        return a[by]
    values = np.asarray(by)
    idx = a["index"]
    if (idx < 0).any() or (len(idx) and idx.max() >= len(values)):
        raise ValueError(f"group array of length {len(values)} cannot be indexed by the history's sample "
                         f"indices (range {idx.min()}..{idx.max()})")
    return values[idx]


def _check_period(per: str) -> None:
    if per not in PERIODS:
        raise ValueError(f"per must be one of {PERIODS}, got {per!r}")


@dataclass
class GroupStats:
    """Weight statistics per period (rows) and group (columns); nan where a group has no rows in a period."""

    periods: np.ndarray
    groups: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    per: str = "epoch"

    def of(self, group) -> Dict[str, np.ndarray]:
        """The columns of one group: ``{"mean", "std", "count"}`` over :attr:`periods`."""
        hits = np.flatnonzero(self.groups == group)
        if not len(hits):
            raise KeyError(f"no group {group!r}; groups: {self.groups.tolist()}")
        j = hits[0]
        return {"mean": self.mean[:, j], "std": self.std[:, j], "count": self.count[:, j]}

    def to_frame(self):
        """A long pandas DataFrame (``per``, group, mean, std, count); needs pandas."""
        import pandas as pd

        p, g = np.meshgrid(self.periods, self.groups, indexing="ij")
        return pd.DataFrame({self.per: p.ravel(), "group": g.ravel(), "mean": self.mean.ravel(),
                             "std": self.std.ravel(), "count": self.count.ravel()})


def group_stats(source: Source, by: Groups, per: str = "epoch", value: str = "weight") -> GroupStats:
    """Mean, std and count of ``value`` per period and group over every recorded row.

    Each period pools all rows recorded in it (one per sample per epoch in ordinary training). The std is the
    population std (ddof 0).
    """
    _check_period(per)
    a = as_arrays(source)
    g, t, v = _column(a, by), a[per], a[value].astype(np.float64)
    periods, ti = np.unique(t, return_inverse=True)
    groups, gi = np.unique(g, return_inverse=True)
    shape = (len(periods), len(groups))
    count = np.zeros(shape)
    total = np.zeros(shape)
    sq = np.zeros(shape)
    np.add.at(count, (ti, gi), 1)
    np.add.at(total, (ti, gi), v)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        np.add.at(sq, (ti, gi), (v - mean[ti, gi]) ** 2)
        std = np.sqrt(sq / count)
    return GroupStats(periods, groups, mean, std, count.astype(np.int64), per)


@dataclass
class Roc:
    """A ROC curve (false and true positive rates, from (0, 0) to (1, 1)) and its area."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def roc_curve(scores, positive) -> Roc:
    """ROC of ``scores`` (higher = more positive) for boolean labels; tied scores form one diagonal segment.

    Example:
        >>> r = roc_curve([0.9, 0.4, 0.6, 0.1], [True, True, False, False])
        >>> r.fpr.tolist(), r.tpr.tolist(), r.auc
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0], 0.75)
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(positive, bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs both positive and negative samples")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last position of each distinct score
    tp, fp = np.cumsum(y)[ends], np.cumsum(~y)[ends]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return Roc(fpr, tpr, auroc(s, y))


def _period_rows(a: Dict[str, np.ndarray], epoch: Optional[int]) -> np.ndarray:
    """Row positions of the last weight of each sample within ``epoch`` (None: the last epoch)."""
    if not len(a["epoch"]):
        raise ValueError("the weight history is empty")
    e = int(a["epoch"].max()) if epoch is None else epoch
    sel = np.flatnonzero(a["epoch"] == e)
    if not len(sel):
        raise ValueError(f"no weights recorded in epoch {e}; epochs: {np.unique(a['epoch']).tolist()}")
    idx = a["index"][sel]
    order = np.lexsort((sel, idx))
    last = np.r_[idx[order][1:] != idx[order][:-1], True]
    return sel[order][last]


def final_weights(source: Source, epoch: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Every column at each sample's last row within ``epoch`` (default: the last epoch), sorted by index."""
    a = as_arrays(source)
    rows = _period_rows(a, epoch)
    return {k: v[rows] for k, v in a.items()}


def weight_roc(source: Source, by: Groups, positive=1, epoch: Optional[int] = None) -> Roc:
    """ROC of each sample's last weight in ``epoch`` (default: last) for the flag ``group == positive``.

    For noise flags, ``positive=0`` asks how well high weights pick out clean samples.
    """
    a = as_arrays(source)
    rows = _period_rows(a, epoch)
    return roc_curve(a["weight"][rows], _column(a, by)[rows] == positive)


def auroc_over_time(source: Source, by: Groups, positive=1, per: str = "epoch") -> Tuple[np.ndarray, np.ndarray]:
    """``(periods, auroc)``: the AUROC of the weights for ``group == positive`` among the rows of each period."""
    _check_period(per)
    a = as_arrays(source)
    flag = _column(a, by) == positive
    periods = np.unique(a[per])
    aucs = np.array([auroc(a["weight"][a[per] == p], flag[a[per] == p]) for p in periods])
    return periods, aucs


def trajectories(source: Source, indices: Iterable[int]) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """``{index: (steps, weights)}``: every weight recorded for the chosen samples, in step order."""
    a = as_arrays(source)
    out = {}
    for i in indices:
        sel = np.flatnonzero(a["index"] == i)
        if not len(sel):
            raise KeyError(f"sample {i} has no recorded weights")
        sel = sel[np.argsort(a["step"][sel], kind="mergesort")]
        out[int(i)] = (a["step"][sel], a["weight"][sel].astype(np.float64))
    return out


def pick_samples(source: Source, by: Groups, per_group: int = 3, seed: int = 0) -> Dict[object, List[int]]:
    """Up to ``per_group`` random sample indices from each group (a sample's group is its last recorded one)."""
    a = as_arrays(source)
    g = _column(a, by)
    rng = np.random.default_rng(seed)
    out = {}
    for value in np.unique(g):
        members = np.unique(a["index"][g == value])
        chosen = rng.choice(members, size=min(per_group, len(members)), replace=False)
        out[value.item()] = sorted(int(i) for i in chosen)
    return out


def metric_trajectories(rows: Sequence[Dict], prefix: str, event: str = "step", x: str = "step"
                        ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """``(x, {name: values})`` for every logged metric whose key starts with ``prefix`` (prefix stripped).

    For per-domain weights or policy probabilities logged as e.g. ``domain_weight/0``, ``domain_weight/1``.
    Rows without any such key are skipped; a key missing from a row reads as nan.

    Example:
        >>> rows = [{"event": "step", "step": 1, "p/a": 0.2, "p/b": 0.8}, {"event": "step", "step": 2, "p/a": 0.5}]
        >>> metric_trajectories(rows, "p/")
        (array([1., 2.]), {'a': array([0.2, 0.5]), 'b': array([0.8, nan])})
    """
    rows = [r for r in rows if r.get("event", event) == event and any(k.startswith(prefix) for k in r)]
    if not rows:
        raise KeyError(f"no {event!r} row has a metric starting with {prefix!r}")
    names = sorted({k for r in rows for k in r if k.startswith(prefix)}, key=lambda k: (len(k), k))
    xs = np.array([r[x] for r in rows], np.float64)
    series = {k[len(prefix):]: np.array([np.nan if r.get(k) is None else r[k] for r in rows], np.float64)
              for k in names}
    return xs, series


def binned_stat(x, y, bins: int = 8, quantiles: bool = True) -> Dict[str, np.ndarray]:
    """Mean of ``y`` in bins of ``x``: ``{"center", "mean", "std", "count"}`` (empty bins dropped).

    ``quantiles=True`` gives bins of (nearly) equal counts, otherwise equal widths. Useful for a weight or fusion
    ratio α against a continuous feature such as a distance of the trilateral geometry.

    Example:
        >>> binned_stat([0, 1, 2, 3], [1.0, 3.0, 10.0, 20.0], bins=2)["mean"].tolist()
        [2.0, 15.0]
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape or not len(x):
        raise ValueError(f"x {x.shape} and y {y.shape} must be non-empty and equal in shape")
    edges = np.quantile(x, np.linspace(0, 1, bins + 1)) if quantiles else np.linspace(x.min(), x.max(), bins + 1)
    edges = np.unique(edges)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max(len(edges) - 2, 0))
    keep = [b for b in range(max(len(edges) - 1, 1)) if (which == b).any()]
    return {"center": np.array([x[which == b].mean() for b in keep]),
            "mean": np.array([y[which == b].mean() for b in keep]),
            "std": np.array([y[which == b].std() for b in keep]),
            "count": np.array([int((which == b).sum()) for b in keep])}


def triangle_edges(labels, teacher, student=None) -> Dict[str, np.ndarray]:
    """Per-sample Euclidean edge lengths of the student–teacher–label triangle (TGeo-KD's geometry).

    ``teacher`` and ``student`` are ``(n, classes)`` probabilities, ``labels`` integer classes; G is the one-hot
    label. Returns ``{"T-G"}``, plus ``"S-G"`` and ``"S-T"`` when ``student`` is given.

    Example:
        >>> e = triangle_edges([0], teacher=[[0.0, 1.0]], student=[[1.0, 0.0]])
        >>> {k: round(float(v[0]), 4) for k, v in e.items()}
        {'T-G': 1.4142, 'S-G': 0.0, 'S-T': 1.4142}
    """
    t = np.asarray(teacher, np.float64)
    y = np.asarray(labels, np.int64).ravel()
    if t.ndim != 2 or len(y) != len(t):
        raise ValueError(f"teacher must be (n, classes) with n = {len(y)} labels, got {t.shape}")
    g = np.eye(t.shape[1])[y]
    dist = lambda a, b: np.linalg.norm(a - b, axis=1)  # noqa: E731
    out = {"T-G": dist(t, g)}
    if student is not None:
        s = np.asarray(student, np.float64)
        if s.shape != t.shape:
            raise ValueError(f"student {s.shape} and teacher {t.shape} probabilities differ in shape")
        out.update({"S-G": dist(s, g), "S-T": dist(s, t)})
    return out
