"""TensorBoard logging: step and epoch scalars plus histograms of the learned per-sample weights.

Local files only (TensorBoard never uploads): event files go to ``log_dir``; view them with
``tensorboard --logdir <log_dir>``. Only rank 0 logs in a distributed run. A resumed run purges events written
after the checkpoint's step, so curves have no duplicates.

Example:
    >>> import tempfile
    >>> logger = TensorBoardLogger(tempfile.mkdtemp())   # nothing is written until training starts
    >>> logger.every
    1
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from .callbacks import Callback


def _scalars(metrics: Dict[str, Any]):
    for k, v in metrics.items():
        if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            yield k, float(v)


class TensorBoardLogger(Callback):
    """A :class:`~metareweight.callbacks.Callback` that writes TensorBoard event files.

    Scalars ``train/<metric>`` every ``every``-th step and ``epoch/<metric>`` every epoch (x axis: the global
    step); histograms ``weights/all`` of each sample's last weight in the epoch, and ``weights/clean`` /
    ``weights/noisy`` when the trainer has ``noisy=`` flags (or the batches carry a ``noisy`` field).

    Args:
        log_dir: where event files go (created).
        every: log step scalars every ``every``-th step (epochs are always logged).
        histograms: write the weight histograms.
    """

    main_process_only = True

    def __init__(self, log_dir: Union[str, Path] = "runs", every: int = 1, histograms: bool = True):
        self.log_dir = Path(log_dir)
        self.every = max(1, int(every))
        self.histograms = histograms
        self.writer = None

    def on_fit_start(self, trainer: Any) -> None:
        if self.writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("logger='tensorboard' needs the tensorboard package: pip install tensorboard") from None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        step = getattr(trainer, "global_step", 0)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step or None)

    def on_step_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        if self.writer is None or trainer.global_step % self.every:
            return
        for k, v in _scalars(metrics):
            self.writer.add_scalar(f"train/{k}", v, trainer.global_step)

    def on_epoch_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in _scalars(metrics):
            self.writer.add_scalar(f"epoch/{k}", v, trainer.global_step)
        if self.histograms:
            for name, w in self._weights(trainer).items():
                if w.size:
                    self.writer.add_histogram(f"weights/{name}", w, trainer.global_step)
        self.writer.flush()

    @staticmethod
    def _weights(trainer: Any) -> Dict[str, np.ndarray]:
        latest = trainer.weights_history.latest(epoch=trainer.epoch)
        w = latest["weight"]
        out = {"all": w}
        flags: Optional[np.ndarray] = None
        noisy = getattr(trainer, "noisy", None)
        if noisy is not None and w.size and (latest["index"] >= 0).all() and latest["index"].max() < len(noisy):
            flags = np.asarray(noisy, bool)[latest["index"]]
        elif "noisy" in latest:
            flags = latest["noisy"].astype(bool)
        if flags is not None:
            out.update(clean=w[~flags], noisy=w[flags])
        return out

    def on_fit_end(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
