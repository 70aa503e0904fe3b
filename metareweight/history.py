"""Per-sample weight history: every weight the trainer used, with its step, epoch, sample index and groups.

Rows live in growable typed arrays (about 32 bytes a row with a class column, no Python object per sample). A
``keep`` bound limits what stays in memory: ``"all"``, ``"last_epoch"`` or an integer N (the rows of the last N
steps). With :meth:`WeightHistory.stream_to` every row is also appended to a directory of chunk files as training
goes (``log_dir/weights/``), so the memory and the checkpoints stay flat while the files hold the whole run;
:func:`read_stream` reads them back and the trainer writes them into ``weights.npz`` at the end of ``fit``.

Example:
    >>> h = WeightHistory(keep=2)
    >>> for step in range(4):
    ...     h.record(step, 0, torch.tensor([0, 1]), torch.tensor([0.1 * step, 0.5]))
    >>> sorted(set(h.arrays()["step"].tolist())), len(h)
    ([2, 3], 4)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch

CORE_COLUMNS = ("step", "epoch", "index", "weight")
CORE_DTYPES = {"step": np.int64, "epoch": np.int32, "index": np.int64, "weight": np.float32}
DEFAULT_KEEP = 10_000  # steps kept in memory by default: a long run stays flat, short runs keep everything
STREAM_DIR = "weights"
FLUSH_ROWS = 1 << 16  # a streaming history writes a chunk at least every this many rows

Keep = Union[str, int]


def check_keep(keep: Keep) -> Keep:
    """``keep`` validated: ``"all"``, ``"last_epoch"`` or an integer number of steps >= 1."""
    if isinstance(keep, str) and keep in ("all", "last_epoch"):
        return keep
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool) and keep >= 1:
        return int(keep)
    raise ValueError(f"history must be 'all', 'last_epoch' or a number of steps >= 1, got {keep!r}")


def _fill_dtype(dtype: np.dtype) -> np.dtype:
    """A dtype that holds ``dtype``'s values and the fill value -1 (bool columns become int8)."""
    return np.dtype(np.int8) if dtype == np.bool_ else np.promote_types(dtype, np.int8)


class WeightHistory:
    """A column store of ``(step, epoch, index, weight, *groups)`` rows, bounded by ``keep``.

    Args:
        keep: ``"all"``, ``"last_epoch"`` (the rows of the newest epoch) or N (the rows of the newest N steps).

    Example:
        >>> h = WeightHistory()
        >>> h.record(0, 0, torch.tensor([3, 5]), torch.tensor([0.2, 0.9]), noisy=torch.tensor([True, False]))
        >>> h[5]
        [(0, 0.8999999761581421)]
        >>> h.latest()["weight"].tolist()
        [0.20000000298023224, 0.8999999761581421]
    """

    def __init__(self, keep: Keep = "all"):
        self.keep = check_keep(keep)
        self._data: Dict[str, np.ndarray] = {c: np.zeros(0, CORE_DTYPES[c]) for c in CORE_COLUMNS}
        self._n = 0  # rows in the buffers
        self._lo = 0  # rows before this one are outside the bound (dropped at the next compaction)
        self._base = 0  # absolute row number of buffer row 0
        self._cache: Optional[Dict[str, np.ndarray]] = None
        self.stream_dir: Optional[Path] = None
        self.writer = True  # False: another process (rank 0) writes the stream; this one only reads it
        self.flushed = 0  # absolute rows written to the stream

    # ---- recording --------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Rows recorded since the start (kept or not)."""
        return self._base + self._n

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        cap = len(self._data["step"])
        if need <= cap:
            return
        keep_from = self._lo if self.stream_dir is None else min(self._lo, max(0, self.flushed - self._base))
        if keep_from > 0 and keep_from >= self._n // 2:  # compact instead of growing
            for k, v in self._data.items():
                v[:self._n - keep_from] = v[keep_from:self._n]
            self._n -= keep_from
            self._lo -= keep_from
            self._base += keep_from
            if self._n + extra <= cap:
                return
        cap = max(1024, need, 2 * cap)
        for k, v in self._data.items():
            grown = np.empty(cap, v.dtype)
            grown[:self._n] = v[:self._n]
            self._data[k] = grown

    def _column(self, name: str, dtype: np.dtype) -> None:
        """Make sure column ``name`` exists and can hold ``dtype`` (earlier rows of a new column are -1)."""
        cur = self._data.get(name)
        if cur is None:
            arr = np.full(len(self._data["step"]), -1, _fill_dtype(dtype) if self._n else dtype)
            self._data[name] = arr
            return
        want = np.promote_types(cur.dtype, dtype)
        if want != cur.dtype:
            self._data[name] = cur.astype(want)

    def record(self, step: int, epoch: int, index: Optional[torch.Tensor], weight: torch.Tensor,
               **groups: torch.Tensor) -> None:
        w = weight.detach().float().cpu().numpy().ravel()
        n = w.shape[0]
        rows = {"weight": w, "index": (np.full(n, -1, np.int64) if index is None
                                        else index.detach().cpu().numpy().astype(np.int64).ravel())}
        for k, v in groups.items():
            rows[k] = v.detach().cpu().numpy().ravel() if torch.is_tensor(v) else np.asarray(v).ravel()
        for k, v in rows.items():
            if k not in CORE_COLUMNS:
                self._column(k, v.dtype)
        for k, v in (list(self._data.items()) if len(self._data) > len(rows) + 2 else ()):
            if k not in rows and k not in CORE_COLUMNS and v.dtype == np.bool_:
                self._data[k] = v.astype(np.int8)  # a group missing from this batch is filled with -1
        if self._n and (self._data["step"][self._n - 1] > step or self._data["epoch"][self._n - 1] > epoch):
            raise ValueError(f"weight history rows must come in step order: step {step} after "
                             f"{int(self._data['step'][self._n - 1])}")
        self._reserve(n)
        lo, hi = self._n, self._n + n
        self._data["step"][lo:hi] = step
        self._data["epoch"][lo:hi] = epoch
        for k, v in self._data.items():
            if k in rows:
                v[lo:hi] = rows[k]
            elif k not in ("step", "epoch"):
                v[lo:hi] = -1
        self._n = hi
        self._apply_bound()
        self._cache = None
        if self.stream_dir is not None and self.total - self.flushed >= FLUSH_ROWS:
            self.flush()

    def _apply_bound(self) -> None:
        if self.keep == "all" or self._n == 0:
            return
        if self.keep == "last_epoch":
            col, cutoff = self._data["epoch"], self._data["epoch"][self._n - 1]
        else:
            col, cutoff = self._data["step"], self._data["step"][self._n - 1] - self.keep + 1
        self._lo = int(np.searchsorted(col[:self._n], cutoff, side="left"))  # rows are in step/epoch order

    # ---- reading ----------------------------------------------------------------------------------------------
    def arrays(self) -> Dict[str, np.ndarray]:
        """The kept rows as a dict of equal-length arrays (copies)."""
        if self._cache is None:
            self._cache = {k: v[self._lo:self._n].copy() for k, v in self._data.items()}
        return self._cache

    def tail(self, rows: int) -> Dict[str, np.ndarray]:
        """The newest ``rows`` kept rows (copies; cheap however long the history)."""
        start = max(self._lo, self._n - rows)
        return {k: v[start:self._n].copy() for k, v in self._data.items()}

    def __len__(self) -> int:
        return self._n - self._lo

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

    def set_column(self, name: str, values_by_index: np.ndarray) -> None:
        """Add (or overwrite) a per-sample column looked up by each row's sample index (-1 where unknown)."""
        values = np.asarray(values_by_index)
        idx = self._data["index"][:self._n]
        known = (idx >= 0) & (idx < len(values))
        col = np.full(len(self._data["step"]), -1, _fill_dtype(values.dtype))
        col[:self._n][known] = values[idx[known]]
        self._data[name] = col
        self._cache = None

    # ---- files ------------------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> None:
        save_arrays(self.arrays(), path)

    @classmethod
    def load(cls, path, keep: Keep = "all") -> "WeightHistory":
        with np.load(path) as data:
            return cls.from_arrays({k: data[k] for k in data.files}, keep)

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray], keep: Keep = "all") -> "WeightHistory":
        h = cls(keep)
        n = len(arrays["step"]) if "step" in arrays else 0
        h._data = {k: np.asarray(v).copy() for k, v in arrays.items()}
        for c in CORE_COLUMNS:
            h._data.setdefault(c, np.zeros(n, CORE_DTYPES[c]))
        h._n = n
        h._apply_bound()
        return h

    # ---- streaming to log_dir ---------------------------------------------------------------------------------
    def stream_to(self, directory: Union[str, Path], write: bool = True) -> None:
        """Append every row to chunk files in ``directory`` (at :meth:`flush`, and every ``FLUSH_ROWS`` rows).
        With ``write=False`` (the other ranks of a distributed run, whose rank 0 writes the same rows) nothing is
        written, but a resume reads the window back from the directory."""
        self.stream_dir = Path(directory)
        self.writer = write
        self.flushed = self._base

    def flush(self) -> None:
        """Write the rows recorded since the last flush as one chunk file (atomically)."""
        if self.stream_dir is None or self.total == self.flushed:
            return
        if not self.writer:
            self.flushed = self.total
            return
        self.stream_dir.mkdir(parents=True, exist_ok=True)
        if self.flushed == 0:
            truncate_stream(self.stream_dir, 0)  # a fresh run: chunks of an earlier run in the same log_dir go
        start = self.flushed - self._base
        save_arrays({k: v[start:self._n] for k, v in self._data.items()},
                    self.stream_dir / f"{self.flushed:012d}.npz", compressed=False)
        self.flushed = self.total

    def state_dict(self) -> Dict:
        """What a checkpoint keeps: with a stream, only how many rows the files hold (the window is re-read from
        them on resume); without, the kept rows themselves (bounded by ``keep``)."""
        if self.stream_dir is not None:
            self.flush()
            return {"keep": self.keep, "streamed": self.flushed}
        return {"keep": self.keep, "arrays": self.arrays(), "base": self._base + self._lo}

    def load_state_dict(self, state: Dict) -> None:
        if "arrays" in state:
            arrays, base = state["arrays"], state["base"]
        else:
            rows = state["streamed"]
            if self.stream_dir is None:
                raise ValueError("this checkpoint's weight history lives in its log_dir: build the trainer with "
                                 "the same log_dir to resume it")
            if self.writer:
                truncate_stream(self.stream_dir, rows)
            arrays, base = read_stream(self.stream_dir, keep=self.keep, rows=rows), rows
            base -= len(arrays["step"]) if arrays else 0
        fresh = WeightHistory.from_arrays(arrays, self.keep) if arrays else WeightHistory(self.keep)
        self._data, self._n, self._lo, self._cache = fresh._data, fresh._n, fresh._lo, None
        self._base = base
        if self.stream_dir is not None:
            self.flushed = self.total


def save_arrays(arrays: Dict[str, np.ndarray], path: Union[str, Path], compressed: bool = True) -> None:
    """``np.savez`` atomically (a temporary file, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)
    os.replace(tmp, path)


def _chunks(directory: Path) -> List[Path]:
    return sorted(p for p in Path(directory).glob("*.npz") if p.stem.isdigit())


def truncate_stream(directory: Union[str, Path], rows: int) -> None:
    """Delete the chunks that start at or after row ``rows`` (written after the checkpoint a run resumes from),
    and stale temporary files."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in _chunks(directory):
        if int(p.stem) >= rows:
            p.unlink()
    for p in directory.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def read_stream(directory: Union[str, Path], keep: Keep = "all", rows: Optional[int] = None) -> Dict[str, np.ndarray]:
    """The rows streamed to ``directory`` (the first ``rows`` if given), or with a ``keep`` bound only the newest rows
    it keeps (``{}`` if none)."""
    parts: List[Dict[str, np.ndarray]] = []
    chunks = [p for p in _chunks(Path(directory)) if rows is None or int(p.stem) < rows]
    for p in reversed(chunks):
        with np.load(p) as data:
            parts.insert(0, {k: data[k] for k in data.files})
        if keep != "all":
            first, last = parts[0], parts[-1]
            col = "epoch" if keep == "last_epoch" else "step"
            cutoff = last[col][-1] if keep == "last_epoch" else last["step"][-1] - keep + 1
            if len(first[col]) and first[col][0] < cutoff:
                break
    if not parts:
        return {}
    names = list(dict.fromkeys(k for part in parts for k in part))
    out = {}
    for k in names:
        cols = [part[k] if k in part else np.full(len(part["step"]), -1, np.int8) for part in parts]
        out[k] = np.concatenate(cols)
    if keep != "all":
        h = WeightHistory.from_arrays(out, keep)
        out = h.arrays()
    return out
