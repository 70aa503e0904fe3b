"""Per-sample weight history: every weight the trainer used, with its step, epoch, sample index and groups."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch

CORE_COLUMNS = ("step", "epoch", "index", "weight")


class WeightHistory:
    """A growing column store of ``(step, epoch, index, weight, *groups)`` rows.

    Example:
        >>> h = WeightHistory()
        >>> h.record(0, 0, torch.tensor([3, 5]), torch.tensor([0.2, 0.9]), noisy=torch.tensor([True, False]))
        >>> h[5]
        [(0, 0.8999999761581421)]
        >>> h.latest()["weight"].tolist()
        [0.20000000298023224, 0.8999999761581421]
    """

    def __init__(self):
        self._chunks: Dict[str, List[np.ndarray]] = {c: [] for c in CORE_COLUMNS}
        self._cache: Optional[Dict[str, np.ndarray]] = None

    def record(self, step: int, epoch: int, index: Optional[torch.Tensor], weight: torch.Tensor,
               **groups: torch.Tensor) -> None:
        w = weight.detach().float().cpu().numpy().ravel()
        n = w.shape[0]
        idx = np.full(n, -1, np.int64) if index is None else index.detach().cpu().numpy().astype(np.int64).ravel()
        rows = {"step": np.full(n, step, np.int64), "epoch": np.full(n, epoch, np.int32), "index": idx, "weight": w}
        for k, v in groups.items():
            rows[k] = v.detach().cpu().numpy().ravel() if torch.is_tensor(v) else np.asarray(v).ravel()
        known = len(self._chunks["step"])
        for k in rows:
            if k not in self._chunks:  # a group that appears late: earlier rows get a fill value
                self._chunks[k] = [np.full(len(c), -1) for c in self._chunks["step"]]
        for k in self._chunks:
            self._chunks[k].append(rows.get(k, np.full(n, -1)))
        assert all(len(c) == known + 1 for c in self._chunks.values())
        self._cache = None

    def arrays(self) -> Dict[str, np.ndarray]:
        """All rows as a dict of equal-length arrays."""
        if self._cache is None:
            self._cache = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self._chunks.items()}
        return self._cache

    def __len__(self) -> int:
        return int(sum(len(c) for c in self._chunks["step"]))

    def __getitem__(self, index: int):
        """The weight trajectory of one sample: a list of ``(step, weight)``."""
        a = self.arrays()
        sel = a["index"] == index
        return list(zip(a["step"][sel].tolist(), a["weight"][sel].tolist()))

    def latest(self, epoch: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The last recorded row of each sample (within ``epoch`` if given), sorted by index."""
        a = self.arrays()
        sel = np.ones(len(a["step"]), bool) if epoch is None else a["epoch"] == epoch
        idx = a["index"][sel]
        order = np.lexsort((np.arange(len(idx)), idx))  # stable: later rows after earlier ones per index
        idx_sorted = idx[order]
        last = np.r_[idx_sorted[1:] != idx_sorted[:-1], True] if len(idx_sorted) else np.zeros(0, bool)
        pick = np.flatnonzero(sel)[order[last]]
        return {k: v[pick] for k, v in a.items()}

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **self.arrays())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "WeightHistory":
        h = cls()
        with np.load(path) as data:
            for k in data.files:
                h._chunks[k] = [data[k]]
        return h
