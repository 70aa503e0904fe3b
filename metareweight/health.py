"""Warnings about training that runs but learns nothing useful, each given once with advice.

:class:`HealthMonitor` is a callback the trainer adds by default (``MetaTrainer(health=False)`` leaves it out). It
looks at the newest recorded weights and the logged losses and warns (:class:`HealthWarning`) when

- the weights **collapsed** to ~0 (the model barely trains; normalised weights then divide by a floor);
- the weights are **saturated** at 0 or 1 (a meta learning rate too large: the ranking can invert);
- the weights have **not spread** after ``spread_after`` meta steps (a meta learning rate too small);
- the model is **stuck at chance loss** ln C (train loss within 0.5 %, and the meta loss near it too, at two epoch ends in a row) after ``chance_after_epochs`` epochs;
- with ``noisy=`` flags and Meta-Weight-Net, the weights **rank flipped samples above clean ones** (weight AUROC
  < 0.4; on imbalanced labels the advice is ``MetaWeightNet(meta_class_prior="train")``) or **barely tell them
  apart** (AUROC < 0.6: the loss carries no information about the flips on this data), judged at the end of a
  ``fit`` of at least ``ranking_after_epochs`` epochs (:func:`~metareweight.objectives.mwnet.weight_advice`);
- a train batch holds **one sample** (normalised weights of one sample are always 1: the hypergradient is 0).

Example:
    >>> import warnings
    >>> monitor = HealthMonitor()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     monitor.check_weights(np.full(64, 1e-6), meta_steps=10)
    >>> [str(w.message).split(":")[0] for w in caught]
    ['weights collapsed']
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Set

import numpy as np

from .callbacks import Callback

__all__ = ["HealthMonitor", "HealthWarning"]


class HealthWarning(UserWarning):
    """Training runs, but in a way that usually means a setting is wrong; the message says which and what to do."""


class HealthMonitor(Callback):
    """Warn once per problem about degenerate training (see module docs).

    Args:
        every: check the weights every ``every`` steps (and at every epoch's end).
        window: how many of the newest recorded weights to look at.
        spread_after: meta steps after which weights that still do not spread are reported.
        chance_after_epochs: epochs after which a train loss within 0.5 % of ln C is reported.
        ranking_after_epochs: a ``fit`` shorter than this is not judged on Meta-Weight-Net's ranking of the
            ``noisy=`` flags (judged once, at its end): early weights have not separated yet.
    """

    def __init__(self, every: int = 50, window: int = 4096, spread_after: int = 200, chance_after_epochs: int = 3,
                 ranking_after_epochs: int = 5):
        self.every, self.window = every, window
        self.spread_after, self.chance_after_epochs = spread_after, chance_after_epochs
        self._near_chance = 0  # consecutive epoch ends with the train loss at ln C
        self.ranking_after_epochs = ranking_after_epochs
        self.warned: Set[str] = set()

    def state_dict(self) -> Dict[str, Any]:
        return {"warned": sorted(self.warned)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.warned = set(state.get("warned", ()))

    def warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, HealthWarning, stacklevel=3)

    # ---- the checks ------------------------------------------------------------------------------------------
    def check_weights(self, w: np.ndarray, meta_steps: int, learned: bool = True) -> None:
        """Collapsed, saturated or unspread weights (``w``: the newest recorded weights; ``learned=False``: a
        fixed-weight baseline, never "unspread")."""
        w = np.asarray(w, dtype=np.float64)
        w = w[np.isfinite(w)]
        if w.size < 2 or (w < 0).any():  # signed "weights" (e.g. advantages) are not weights in [0, ∞)
            return
        mean = float(w.mean())
        if mean < 1e-3:
            self.warn("collapsed", f"weights collapsed: their mean is {mean:.1e}, so the model barely trains (and "
                      "weights normalised over a batch divide by a floor). Lower the meta learning rate, check "
                      "the meta set is drawn from the same task, or start the weighting net nearer 1")
            return
        if w.max() <= 1.0:
            saturated = float(((w < 0.01) | (w > 0.99)).mean())
            if saturated > 0.9:
                where = "at 1" if (w > 0.99).all() else "at 0" if (w < 0.01).all() else "at 0 and 1"
                self.warn("saturated", f"weights saturated {where}: {saturated:.0%} are below 0.01 or above 0.99, "
                          "so they no longer rank the samples (and a ranking pushed to the edges can invert: noisy "
                          "samples up-weighted). The meta learning rate is too large: lower meta_lr about 10x")
                return
        if learned and meta_steps >= self.spread_after and float(w.std()) < 1e-3 * max(mean, 1e-12):
            self.warn("no_spread", f"weights do not spread after {meta_steps} meta steps (std {w.std():.1e} around "
                      f"{mean:.3f}): the weighting is uniform and does nothing. Raise the meta learning rate "
                      "(about 10x) or the number of meta steps")

    def check_loss(self, loss: float, classes: int, epochs_done: int, meta_loss: Optional[float] = None) -> None:
        """Warn when the train loss sits at ln C at two epoch ends in a row, from ``chance_after_epochs`` on, and so
        does the meta loss when there is one. One epoch near ln C is no evidence, and neither is the train loss alone:
        on noisy labels a model that rightly refuses the flips has a high unweighted train loss (with 40 % flipped
        digits its epoch mean sits near ln 10 for many epochs) while its loss on the clean meta batches is small."""
        if classes < 2 or not math.isfinite(loss):
            return
        chance = math.log(classes)
        near = abs(loss - chance) < 0.005 * chance and (meta_loss is None or abs(meta_loss - chance) < 0.05 * chance)
        self._near_chance = self._near_chance + 1 if near else 0
        if self._near_chance >= 2 and epochs_done >= self.chance_after_epochs:
            self.warn("chance", f"the model is stuck at chance loss: train loss {loss:.4f} ≈ ln {classes} = "
                      f"{chance:.4f} after {epochs_done} epochs. Raise the learning rate, check inputs are scaled "
                      "and labels match inputs, or check the weights have not collapsed")

    def check_ranking(self, w: np.ndarray, noisy: np.ndarray, labels: Optional[np.ndarray] = None,
                      meta_lr: Optional[float] = None, meta_class_prior: Optional[str] = None,
                      normalize=None) -> None:
        """Meta-Weight-Net's weights against known flips (``noisy``): inverted or not separating."""
        from .objectives.mwnet import weight_advice

        w, flags = np.asarray(w, np.float64).ravel(), np.asarray(noisy).ravel()
        keep = np.isfinite(w) & (flags >= 0)  # -1: a sample without a flag
        labels = None if labels is None else np.asarray(labels).ravel()[keep]
        advice = weight_advice(w[keep], flags[keep].astype(bool), meta_lr, labels, meta_class_prior, normalize)
        if advice and "flipped" in advice:  # the ranking advice; spread and saturation have their own checks
            self.warn("inverted" if "above clean" in advice else "not_separating", advice)

    def check_batch_size(self, size: int) -> None:
        if size == 1:
            self.warn("batch_of_one", "a train batch holds one sample: weights normalised over a batch of one are "
                      "always 1, so the hypergradient is exactly 0 and nothing is learned. Use batch_size >= 2 "
                      "(and drop_last=True if the last batch can hold one sample)")

    # ---- hooks -----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any) -> None:
        if getattr(trainer.train_loader, "batch_size", None) == 1:
            self.check_batch_size(1)

    def _recent(self, trainer: Any) -> Dict[str, np.ndarray]:
        history = trainer.weights_history
        if hasattr(history, "tail"):
            return history.tail(self.window)
        return {k: v[-self.window:] for k, v in history.arrays().items()}

    def on_step_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        recent = self._recent(trainer)
        if len(recent["step"]):
            self.check_weights(recent["weight"], trainer.meta_steps, _learns_weights(trainer))

    def on_epoch_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        recent = self._recent(trainer)
        if len(recent["step"]):
            self.check_weights(recent["weight"], trainer.meta_steps, _learns_weights(trainer))
            target = recent.get("target")
            epochs_done = trainer.epoch + 1 - getattr(trainer, "_fit_start_epoch", 0)
            if target is not None and len(target) and "train_loss" in metrics:
                meta_loss = metrics.get("meta_loss")
                self.check_loss(float(metrics["train_loss"]), int(target.max()) + 1, epochs_done,
                                None if meta_loss is None or not math.isfinite(meta_loss) else float(meta_loss))

    def on_fit_end(self, trainer: Any) -> None:
        recent = self._recent(trainer)
        epochs_done = trainer.epoch - getattr(trainer, "_fit_start_epoch", 0)
        if len(recent["step"]) and epochs_done >= self.ranking_after_epochs:
            self._check_trainer_ranking(trainer, recent)

    def _check_trainer_ranking(self, trainer: Any, recent: Dict[str, np.ndarray]) -> None:
        from .objectives.mwnet import MetaWeightNet

        objective = getattr(trainer, "objective", None)
        if not isinstance(objective, MetaWeightNet) or "noisy" not in recent or not len(recent["noisy"]):
            return
        last = recent["epoch"] == recent["epoch"].max() if "epoch" in recent else slice(None)
        self.check_ranking(recent["weight"][last], recent["noisy"][last],
                           recent["target"][last] if "target" in recent else None,
                           objective.meta_lr, objective.meta_class_prior, objective.normalize)


def _learns_weights(trainer: Any) -> bool:
    return bool(getattr(getattr(trainer, "objective", None), "learns_weights", True))
