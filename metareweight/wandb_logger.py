"""Weights & Biases logging: step and epoch metrics plus histograms of the learned per-sample weights.

Offline by default (``mode="offline"``): nothing touches the network unless you pass ``mode="online"`` (or set
``WANDB_MODE``) yourself; ``wandb sync <run dir>`` uploads an offline run later. Only rank 0 logs in a distributed
run. The run id is kept in the trainer's checkpoints, so a resumed run appends to the same run (``resume="allow"``).

Example:
    >>> logger = WandbLogger(project="mwnet-demo", dir="/tmp/wandb-demo")   # no run is started yet
    >>> logger.mode
    'offline'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .callbacks import Callback


class WandbLogger(Callback):
    """A :class:`~metareweight.callbacks.Callback` that logs to wandb.

    Args:
        project: wandb project name.
        name: run name (wandb picks one if ``None``).
        dir: directory for the local run files (``wandb/offline-run-*``).
        mode: ``"offline"`` (default), ``"online"`` or ``"disabled"``; an explicit ``WANDB_MODE`` in the
            environment wins only if you pass ``mode=None``.
        config: hyper-parameters to store with the run.
        every: log every ``every``-th step (epoch metrics and weight histograms are always logged).
        init_kwargs: anything else for ``wandb.init``.
    """

    main_process_only = True

    def __init__(self, project: str = "metareweight", name: Optional[str] = None, dir: Union[str, Path] = ".",
                 mode: Optional[str] = "offline", config: Optional[Dict[str, Any]] = None, every: int = 1,
                 **init_kwargs: Any):
        if mode not in (None, "offline", "online", "disabled"):
            raise ValueError(f"mode must be 'offline', 'online', 'disabled' or None, got {mode!r}")
        self.project, self.name, self.dir, self.mode = project, name, Path(dir), mode
        self.config = dict(config or {})
        self.every = max(1, int(every))
        self.init_kwargs = init_kwargs
        self.run = None
        self.run_id: Optional[str] = None

    # ---- resume -------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Optional[str]]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Dict[str, Optional[str]]) -> None:
        self.run_id = state.get("run_id")

    # ---- hooks ----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any) -> None:
        if self.run is not None:
            return
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("logger='wandb' needs the wandb package: pip install 'metareweight[wandb]'") from exc
        self.dir.mkdir(parents=True, exist_ok=True)
        mode = self.mode or os.environ.get("WANDB_MODE", "offline")
        kwargs = dict(project=self.project, name=self.name, dir=str(self.dir), mode=mode, config=self.config,
                      **self.init_kwargs)
        if self.run_id is not None:
            kwargs.update(id=self.run_id, resume="allow")
        self.run = wandb.init(**kwargs)
        self.run_id = self.run.id

    def on_step_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        if self.run is not None and trainer.global_step % self.every == 0:
            self.run.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=trainer.global_step)

    def on_epoch_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        if self.run is None:
            return
        import wandb

        row: Dict[str, Any] = {f"epoch/{k}": v for k, v in metrics.items()}
        weights = trainer.weights_history.latest(epoch=trainer.epoch)["weight"]
        if weights.size:
            row["weights/histogram"] = wandb.Histogram(weights)
        self.run.log(row, step=trainer.global_step)

    def on_fit_end(self, trainer: Any) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
