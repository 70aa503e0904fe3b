"""``WeightRecorder``: the weight history as a callback of :class:`~metareweight.MetaStep`, and the weight AUROC.

:class:`~metareweight.MetaTrainer` builds one and passes :meth:`WeightRecorder.record` as ``MetaStep(record=...)``:
every batch's per-sample weights go into a bounded :class:`~metareweight.history.WeightHistory` (gathered from
every rank when data-parallel; streamed to ``log_dir/weights/`` and written to ``log_dir/weights.npz`` by
:meth:`WeightRecorder.write`). :meth:`WeightRecorder.summary` gives an epoch's weight statistics and, with noise
flags, the weight AUROC of clean against noisy samples. A loop of your own can use it the same way.

Example:
    >>> import torch
    >>> from metareweight import Batch
    >>> rec = WeightRecorder(noisy=[False, False, True, True])
    >>> rec.record(Batch(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), torch.arange(4)),
    ...            torch.tensor([0.9, 0.8, 0.1, 0.2]))
    >>> rec.summary(epoch=0)["weight_auroc"], len(rec.history)
    (1.0, 4)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .core.strategy import Collectives
from .data.batch import Batch
from .data.indexed import check_index
from .history import DEFAULT_KEEP, STREAM_DIR, Keep, WeightHistory, read_stream, save_arrays
from .metrics import auroc

__all__ = ["WeightRecorder"]


def group_columns(batch: Batch) -> Dict[str, torch.Tensor]:
    """Per-sample integer/bool fields of a batch worth keeping beside the weights (noise flags, domains, class)."""
    out = {}
    n = batch.size
    if torch.is_tensor(batch.targets) and batch.targets.dim() == 1 and not batch.targets.dtype.is_floating_point:
        out["target"] = batch.targets
    for k, v in batch.extras.items():
        if torch.is_tensor(v) and v.dim() == 1 and v.shape[0] == n and not v.dtype.is_floating_point:
            out[k] = v
    return out


class WeightRecorder:
    """Records the weights every step uses and summarises them per epoch.

    Args:
        noisy: optional boolean flags per dataset index (True = corrupted); enables the weight AUROC. A batch's own
            ``noisy`` field is used where it has one.
        keep: the in-memory bound of :attr:`history` (``"all"``, ``"last_epoch"`` or a number of steps).
        log_dir: stream every row to ``log_dir/weights/`` (rank 0) and let :meth:`write` put the whole run into
            ``log_dir/weights.npz``.
        collectives: the data-parallel strategy: the rows of every rank are gathered, so each rank records the
            global batch (default one process).
        clock: returns ``(global_step, epoch)`` of the row being recorded (default ``(0, 0)``).
    """

    def __init__(self, *, noisy: Optional[Sequence[bool]] = None, keep: Keep = DEFAULT_KEEP,
                 log_dir: Optional[Union[str, Path]] = None, collectives: Optional[Collectives] = None,
                 clock: Optional[Callable[[], Tuple[int, int]]] = None):
        self.noisy = None if noisy is None else np.asarray(noisy, bool)
        self.collectives = collectives if collectives is not None else Collectives()
        self.clock = clock or (lambda: (0, 0))
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.history = WeightHistory(keep=keep)
        if self.log_dir is not None:
            self.history.stream_to(self.log_dir / STREAM_DIR, write=self.collectives.is_main)  # rank 0 writes
        self._warned_no_index = False

    def record(self, batch: Batch, weights: torch.Tensor) -> None:
        """Record the weights of the *global* batch (gathered from every rank when distributed)."""
        check_index(batch, self.noisy is not None)
        columns = {"index": batch.index, "weight": weights.detach().float(), **group_columns(batch)}
        if self.noisy is not None and batch.index is not None and "noisy" not in columns:
            index = batch.index.detach().cpu().numpy()
            if index.size and (index.min() < 0 or index.max() >= len(self.noisy)):
                raise ValueError(f"a batch holds sample index {int(index.max())} but noisy= has {len(self.noisy)} "
                                 "flags; give one flag per training sample, in dataset-index order")
            columns["noisy"] = torch.as_tensor(self.noisy[index])
        if self.collectives.enabled:
            parts = self.collectives.gather_object({k: (None if v is None else v.cpu()) for k, v in columns.items()})
            columns = {k: (None if any(p.get(k) is None for p in parts) else torch.cat([p[k] for p in parts]))
                       for k in columns}
        index, weight = columns.pop("index"), columns.pop("weight")
        groups = {k: v for k, v in columns.items() if v is not None}
        step, epoch = self.clock()
        self.history.record(step, epoch, index, weight, **groups)

    def summary(self, epoch: int) -> Dict[str, float]:
        """The epoch's weight statistics: mean, spread and, with noise flags (``noisy=`` or a ``noisy`` field of
        the batches), the clean and noisy means and the weight AUROC of clean against noisy."""
        latest = self.history.latest(epoch=epoch)
        if latest["weight"].size == 0:
            return {}
        w = latest["weight"]
        out = {"weight_mean": float(w.mean()), "weight_std": float(w.std())}
        flags = None
        if "noisy" in latest and (latest["noisy"] >= 0).all():
            flags = latest["noisy"].astype(bool)
        elif self.noisy is not None and (latest["index"] >= 0).all() and latest["index"].max() < len(self.noisy):
            flags = self.noisy[latest["index"]]
        elif self.noisy is not None and not self._warned_no_index:
            self._warned_no_index = True
            warnings.warn("noisy= was given but the batches carry no sample index, so the weights cannot be matched "
                          "to the flags (no weight_auroc); yield (inputs, targets, index) or use "
                          "TensorIndexedDataset", RuntimeWarning, stacklevel=3)
        if flags is not None:
            out["weight_clean"] = float(w[~flags].mean()) if (~flags).any() else math.nan
            out["weight_noisy"] = float(w[flags].mean()) if flags.any() else math.nan
            out["weight_auroc"] = auroc(w, ~flags)
        return out

    def write(self) -> None:
        """``log_dir/weights.npz``: the whole streamed history (rank 0; nothing without ``log_dir``)."""
        if self.log_dir is None or not self.collectives.is_main or self.history.total == 0:
            return  # nothing recorded: an earlier run's weights.npz in the same log_dir stays as it is
        self.history.flush()
        arrays = read_stream(self.log_dir / STREAM_DIR)
        if arrays:
            save_arrays(arrays, self.log_dir / "weights.npz")
