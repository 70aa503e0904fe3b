"""Callbacks and loggers. A logger is a callback that writes metrics somewhere."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Union


class Callback:
    """Hooks the trainer calls; override any of them. ``metrics`` are plain floats.

    Loggers set ``main_process_only = True``: in a distributed run only rank 0 calls them. A callback with state to
    keep across a resume returns it from :meth:`state_dict` (saved in the trainer's checkpoints).
    """

    main_process_only = False

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass

    def on_fit_start(self, trainer: Any) -> None:
        pass

    def on_step_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        pass

    def on_epoch_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        pass

    def on_fit_end(self, trainer: Any) -> None:
        pass


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLogger(Callback):
    """Appends one JSON object per step (``event: "step"``) and per epoch (``event: "epoch"``) to a file.

    Args:
        path: the ``.jsonl`` file (parents are created).
        every: log every ``every``-th step (epochs are always logged).
    """

    main_process_only = True

    def __init__(self, path: Union[str, Path], every: int = 1):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.every = max(1, int(every))

    def state_dict(self) -> Dict[str, int]:
        """The file's length: a resumed run truncates rows written after the checkpoint, so none is duplicated."""
        return {"size": self.path.stat().st_size if self.path.exists() else 0}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if self.path.exists() and self.path.stat().st_size > state["size"]:
            with self.path.open("r+b") as fh:
                fh.truncate(state["size"])

    def restart(self) -> None:
        """Empty the file: ``fit(resume=True)`` found no checkpoint, so the rows of the attempt that wrote it are
        about to be written again."""
        self.load_state_dict({"size": 0})

    def _write(self, row: Dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def on_step_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        if trainer.global_step % self.every == 0:
            self._write({"event": "step", **metrics})

    def on_epoch_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        self._write({"event": "epoch", **metrics})


def read_jsonl(path: Union[str, Path]):
    """Rows of a JSONL metrics file."""
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def make_logger(logger: Union[str, Callback], log_dir: Optional[Union[str, Path]] = None) -> Callback:
    """The trainer's ``logger=``: ``"wandb"`` (offline, in ``log_dir``), ``"tensorboard"`` (event files in
    ``log_dir``, else ``runs/``) or a Callback as it is."""
    if logger == "wandb":
        from .wandb_logger import WandbLogger
        return WandbLogger(dir=log_dir or ".")
    if logger == "tensorboard":
        from .tensorboard_logger import TensorBoardLogger
        return TensorBoardLogger(log_dir or "runs")
    if isinstance(logger, str) or not hasattr(logger, "on_step_end"):
        raise ValueError(f"logger must be 'wandb' or a Callback (or 'tensorboard'), got {logger!r} (JSONL "
                         "logging is switched on by log_dir)")
    return logger
