"""``MetaTrainer``: the bilevel training loop around a user's own model, optimizer and DataLoader.

The trainer is a loop around :class:`~metareweight.MetaStep`, which does the work of one step (virtual steps,
hypergradient, meta step, real step; see :mod:`metareweight.step`). The loop groups train batches by
``unroll_steps``, makes every ``meta_interval``-th group a meta step (the others are plain weighted steps with the
current φ), draws meta batches, and runs epochs, schedulers, callbacks and checkpoints (their state lives in
:class:`~metareweight.checkpoint.Checkpointer`). Every weight used is recorded by a
:class:`~metareweight.recorder.WeightRecorder` in :attr:`MetaTrainer.weights_history`, keyed by sample index;
evaluation is :func:`~metareweight.evaluation.evaluate`.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> ds = TensorIndexedDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
    >>> model = torch.nn.Linear(5, 3)
    >>> trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=16),
    ...                       objective=MetaWeightNet(hidden=8), meta_loader=DataLoader(ds, batch_size=16),
    ...                       progress=False)
    >>> _ = trainer.fit(epochs=1)
    >>> trainer.global_step, len(trainer.weights_history)
    (4, 64)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .callbacks import Callback, JsonlLogger, make_logger
from .core.hypergrad import HypergradMethod
from .core.problem import BilevelProblem
from .data.batch import Batch, as_batch
from .evaluation import evaluate
from .health import HealthMonitor
from .history import DEFAULT_KEEP
from .meta_data import MetaStream, meta_source
from .objectives.base import MetaObjective
from .progress import progress_bar
from .recorder import WeightRecorder
from .step import MetaStep
from .validation import validate_fit_args, validate_trainer_args

STEP_ATTRIBUTES = ("method", "meta_optimizer", "precision", "functional_optimizer", "real_step", "adam_preconditioner",
                   "grad_clip", "meta_grad_clip", "accumulate_steps", "meta_accumulate_steps", "global_step",
                   "meta_steps")  # options and counters of the MetaStep, read and written through the trainer
_COUNTERS = ("global_step", "meta_steps", "epoch", "groups_seen", "_accumulated", "_meta_accumulated",
             "_fit_start_epoch", "_last_checkpoint_step")


def _on_step(name: str) -> property:
    """A trainer attribute that lives on its :class:`~metareweight.MetaStep` (read and written there)."""
    return property(lambda self: getattr(self.stepper, name), lambda self, v: setattr(self.stepper, name, v),
                    doc=f"``MetaStep.{name}`` of :attr:`MetaTrainer.stepper`.")


def _scheduler(name: str) -> property:
    """A scheduler: stepped by the MetaStep with ``scheduler_interval="step"``, by the loop per epoch otherwise."""
    def set_(self, value):
        self._schedulers[name] = value
        setattr(self.stepper, name, value if self.scheduler_interval == "step" else None)
    return property(lambda self: self._schedulers[name], set_)


class MetaTrainer:
    """Meta-learned sample reweighting around your model, optimizer and DataLoader.

    Args:
        model: the ``nn.Module`` to train (kept as is; virtual steps never modify it).
        optimizer: its ``torch.optim`` optimizer (SGD, Adam or AdamW); its state is used by the virtual steps.
        train_loader: yields ``(x, y)``, ``(x, y, index)`` or dicts (see :func:`~metareweight.data.as_batch`).
        objective: a :class:`~metareweight.objectives.MetaObjective` (its parameters are φ).
        meta_loader: meta batches; required when ``objective.meta_data == "loader"``.

    The step (passed to :class:`~metareweight.MetaStep`, see there):
        hypergrad: a method name (``"unrolled"``, ``"finite_difference"``, ``"neumann"``, ...) or instance.
        hypergrad_options: options for a named method, e.g. ``{"terms": 20}`` for Neumann.
        meta_optimizer: optimizer over ``objective.meta_parameters()``; default from the objective.
        unroll_steps: inner steps per meta step (>= 1).
        real_step: ``"recompute"`` (re-weight the batches with the updated φ and step the optimizer) or
            ``"lookahead"`` (commit the method's virtual parameters and optimizer state).
        adam_preconditioner: ``"differentiable"`` or ``"fixed"`` (treat Adam's denominator as constant).
        grad_clip, meta_grad_clip: max gradient norm of the real step / of the hypergradient (None: no clipping).
        accumulate_steps: the model's optimizer steps once every ``accumulate_steps`` real steps on the mean of
            their gradients (needs ``real_step="recompute"``; a partial window is applied at the epoch's end).
        meta_accumulate_steps: the meta optimizer steps once every ``meta_accumulate_steps`` meta steps on the mean
            of their hypergradients (each virtual step still looks ahead from one micro-batch).

    Schedule:
        meta_interval: meta update every ``meta_interval`` groups of ``unroll_steps`` batches (>= 1).
        scheduler, meta_scheduler: optional learning-rate schedulers of ``optimizer`` / the meta optimizer,
            stepped once per epoch or, with ``scheduler_interval="step"``, after every step of their optimizer.
        eval_loader: evaluated at the end of each epoch.

    Strategy:
        precision: ``"fp32"``, ``"bf16"`` (autocast on CPU and GPU) or ``"fp16"`` (GPU, with gradient scalers);
            see :mod:`metareweight.precision`.
        distributed: ``"auto"`` (use an initialised ``torch.distributed`` process group), ``True`` (require one),
            ``False``, or a :class:`~metareweight.distributed.DistributedContext`; see
            :mod:`metareweight.distributed`. Each rank's loaders must yield its shard
            (:func:`~metareweight.distributed.distributed_sampler`).
        checkpoint_dir: where :meth:`save_checkpoint` writes ``last.pt`` (rank 0, atomically): every
            ``checkpoint_every`` real steps and at the end of every epoch. ``fit(resume=True)`` continues from it.
        checkpoint_every: real steps between mid-epoch checkpoints (None: only at epoch ends).

    Logging:
        noisy: optional boolean flags per dataset index (True = corrupted); enables the weight AUROC.
        callbacks: extra :class:`~metareweight.callbacks.Callback` objects.
        log_dir: if given, metrics go to ``log_dir/metrics.jsonl`` and weights to ``log_dir/weights.npz`` (also
            when ``fit`` raises).
        logger: ``"wandb"`` (an offline :class:`~metareweight.wandb_logger.WandbLogger` in ``log_dir``),
            ``"tensorboard"`` (a :class:`~metareweight.tensorboard_logger.TensorBoardLogger` writing to ``log_dir``,
            or ``runs/`` without one) or any callback; JSONL is always written when ``log_dir`` is set.
        progress: show progress: a tqdm bar on a terminal, one line per epoch on stderr otherwise (a pipe or
            a log file stays small).
        history: how much of the weight history :attr:`weights_history` keeps in memory: ``"all"``,
            ``"last_epoch"`` or N (the newest N steps; default 10,000). With ``log_dir`` every row is also appended
            to ``log_dir/weights/`` as training goes and ``weights.npz`` holds the whole run, whatever the bound.
        health: add :class:`~metareweight.health.HealthMonitor` (warnings, once each, about collapsed or saturated
            weights, weights that do not spread, a model stuck at chance loss, a batch of one).

    ``trainer.stepper`` is the :class:`~metareweight.MetaStep`; its options and counters (``method``,
    ``meta_optimizer``, ``precision``, ``global_step``, ``meta_steps``, ...) are read and written through the trainer.
    ``trainer.recorder`` is the :class:`~metareweight.WeightRecorder` the step records into (``weights_history``
    is its history); checkpoints go through :class:`~metareweight.checkpoint.Checkpointer`.
    """

    scheduler = _scheduler("scheduler")
    meta_scheduler = _scheduler("meta_scheduler")
    _accumulated, _meta_accumulated = _on_step("accumulated"), _on_step("meta_accumulated")  # checkpoint counters
    _last_checkpoint_step = property(lambda self: self._checkpointer.last_step,
                                     lambda self, v: setattr(self._checkpointer, "last_step", v))

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable,
                 objective: MetaObjective, *, meta_loader: Optional[Iterable] = None,
                 hypergrad: Union[str, HypergradMethod] = "unrolled",
                 hypergrad_options: Optional[Mapping[str, Any]] = None,
                 meta_optimizer: Optional[torch.optim.Optimizer] = None, meta_interval: int = 1,
                 unroll_steps: int = 1, real_step: str = "recompute", adam_preconditioner: str = "differentiable",
                 noisy: Optional[Sequence[bool]] = None, eval_loader: Optional[Iterable] = None,
                 callbacks: Sequence[Callback] = (), log_dir: Optional[Union[str, Path]] = None,
                 grad_clip: Optional[float] = None, meta_grad_clip: Optional[float] = None,
                 accumulate_steps: int = 1, meta_accumulate_steps: int = 1, precision: str = "fp32",
                 distributed: Union[str, bool, "dist_utils.DistributedContext"] = "auto", scheduler: Any = None,
                 meta_scheduler: Any = None, scheduler_interval: str = "epoch",
                 checkpoint_dir: Optional[Union[str, Path]] = None, checkpoint_every: Optional[int] = None,
                 logger: Union[None, str, Callback] = None, progress: bool = True,
                 history: Union[str, int] = DEFAULT_KEEP, health: bool = True):
        a = validate_trainer_args(locals())  # every check that can be made before training, counts normalised
        self.model, self.optimizer, self.objective, self.train_loader = model, optimizer, objective, train_loader
        # strategy and weight history (the step records every weight it uses)
        self.dist = dist_utils.resolve(distributed)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.recorder = WeightRecorder(noisy=noisy, keep=history, log_dir=self.log_dir, collectives=self.dist,
                                       clock=lambda: (self.global_step, self.epoch))
        self.weights_history, self.noisy = self.recorder.history, self.recorder.noisy
        # the step
        self.stepper = MetaStep(
            model, optimizer, objective, hypergrad, meta_optimizer, hypergrad_options=hypergrad_options,
            unroll_steps=a["unroll_steps"], real_step=real_step, adam_preconditioner=adam_preconditioner,
            grad_clip=a["grad_clip"], meta_grad_clip=a["meta_grad_clip"], accumulate_steps=a["accumulate_steps"],
            meta_accumulate_steps=a["meta_accumulate_steps"], precision=precision, collectives=self.dist,
            record=self.recorder.record)
        self.device = self.stepper.device
        # the schedule
        self.meta_interval, self.unroll_steps = a["meta_interval"], a["unroll_steps"]
        self.scheduler_interval, self._schedulers = scheduler_interval, {}
        self.scheduler, self.meta_scheduler = scheduler, meta_scheduler
        self.meta_stream = MetaStream(meta_source(objective, train_loader, meta_loader))
        self.eval_loader = eval_loader
        # logging: callbacks, the health monitor before the loggers (they stay last), progress
        self.callbacks: List[Callback] = [*callbacks, *([HealthMonitor()] if health else [])]
        if self.log_dir is not None:
            self.callbacks.append(JsonlLogger(self.log_dir / "metrics.jsonl"))
        if logger is not None:
            self.callbacks.append(make_logger(logger, self.log_dir))
        self.progress = progress
        # checkpoints and the loop's state
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = a["checkpoint_every"]
        self.train_position = ckpt.LoaderPosition(train_loader)
        self.epoch_sums: Dict[str, List[float]] = {}
        self._checkpointer = ckpt.Checkpointer(self, _COUNTERS)
        self.epoch = 0
        self.groups_seen = 0
        self._fit_start_epoch = 0
        self.history: List[Dict[str, float]] = []

    # ---- the loop -------------------------------------------------------------------------------------------
    def active_callbacks(self) -> List[Callback]:
        """The callbacks this process runs: loggers only on rank 0."""
        return [cb for cb in self.callbacks if self.dist.is_main or not getattr(cb, "main_process_only", False)]

    def build_problem(self, batches: Sequence[Batch], meta_batch: Batch) -> BilevelProblem:
        """The bilevel problem of a meta step at the current parameters (:meth:`MetaStep.build_problem`)."""
        return self.stepper.build_problem(batches, meta_batch)

    def fit(self, epochs: int = 1, max_steps: Optional[int] = None,
            resume: Union[bool, str, Path] = False) -> List[Dict[str, float]]:
        """Train for ``epochs`` epochs (or until ``max_steps`` real steps in all). Returns the per-epoch metrics.

        Args:
            resume: ``True`` continues from ``checkpoint_dir/last.pt`` if it exists (and starts afresh if not);
                a path continues from that checkpoint. ``epochs`` then counts from the epoch at which the
                interrupted ``fit`` call began, so relaunching the same command finishes the same run.
        """
        epochs, max_steps = validate_fit_args(epochs, max_steps, resume)
        resumed = self._checkpointer.resume(resume)
        if not resumed:
            self._fit_start_epoch = self.epoch
        try:
            self._fit_epochs(epochs, max_steps, resumed)
        finally:  # what was logged is written also when training fails
            self.recorder.write()
        for cb in self.active_callbacks():
            cb.on_fit_end(self)
        return self.history

    def _fit_epochs(self, epochs: int, max_steps: Optional[int], resumed: bool) -> None:
        dist_utils.check_loaders_agree(self.train_loader, getattr(self.meta_stream, "loader", None), self.dist)
        if not resumed:  # every rank starts from rank 0's parameters, buffers and meta-parameters (as DDP does)
            self.dist.broadcast_([*self.model.parameters(), *self.model.buffers(), *self.objective.parameters(),
                                  *self.objective.buffers()])
        for cb in self.active_callbacks():
            cb.on_fit_start(self)
        while self.epoch < self._fit_start_epoch + epochs:
            if max_steps is not None and self.global_step >= max_steps:
                break
            metrics = self._fit_epoch(max_steps)
            self.history.append(metrics)
            for cb in self.active_callbacks():
                cb.on_epoch_end(self, metrics)
            self.epoch += 1
            self._step_schedulers()
            if self.checkpoint_dir is not None and not self._checkpointer.saved_at_this_step():
                self.save_checkpoint()  # one write per step: a save at the epoch's last step resumes into its end
            self.weights_history.flush()

    def _fit_epoch(self, max_steps: Optional[int]) -> Dict[str, float]:
        if not self.train_position.active:  # a resumed run continues its epoch in progress
            self.train_position.start(epoch=self.epoch)
            self.epoch_sums = {}
        bar = progress_bar(f"epoch {self.epoch}", self.train_loader, self.train_position.consumed) \
            if self.progress and self.dist.is_main else None
        pending: List[Batch] = []
        for raw in self.train_position:
            pending.append(as_batch(raw).to(self.device))
            if len(pending) == self.unroll_steps:
                self._end_group(pending, bar)
                pending = []
                if max_steps is not None and self.global_step >= max_steps:
                    break
        else:
            if pending:
                self._end_group(pending, bar)
        if self.train_position.consumed == 0:
            raise ValueError("the train loader yielded no batches")
        self.train_position.stop()
        if bar is not None:
            bar.close()
        self.stepper.flush()
        out = {k: float(np.nanmean(v)) for k, v in self.epoch_sums.items() if k not in ("step", "epoch")}
        out.update(epoch=self.epoch, step=self.global_step, meta_steps=self.meta_steps)
        out.update(self.recorder.summary(self.epoch))
        extra = self.objective.on_epoch_end(self.stepper.context, self.epoch)
        if extra:
            out.update(extra)
        if self.eval_loader is not None:
            out.update({f"eval_{k}": v for k, v in self.evaluate(self.eval_loader).items()})
        return out

    def _run_group(self, batches: List[Batch]) -> Dict[str, float]:
        """One group of ``unroll_steps`` batches: a meta step every ``meta_interval`` groups, else plain steps."""
        due = self.groups_seen % self.meta_interval == 0
        self.groups_seen += 1
        if due:
            return self.stepper.step(batches, self.meta_stream.next()).metrics
        return self.stepper.plain_step(batches).metrics

    def _end_group(self, batches: List[Batch], bar: Any) -> None:
        metrics = self._mean_over_ranks(self._run_group(batches))
        metrics.update(step=self.global_step, epoch=self.epoch)
        for k, v in metrics.items():
            self.epoch_sums.setdefault(k, []).append(float(v))
        for cb in self.active_callbacks():
            cb.on_step_end(self, metrics)
        if bar is not None:
            bar.update(len(batches))
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("train_loss", "meta_loss")})
        every = self.checkpoint_every
        if every and self.global_step // every > self._checkpointer.last_step // every:
            self.save_checkpoint()

    def _step_schedulers(self) -> None:
        """``scheduler_interval="epoch"``: the meta scheduler, then the model's (per-step ones step in the MetaStep)."""
        for scheduler in (self.meta_scheduler, self.scheduler) if self.scheduler_interval == "epoch" else ():
            if scheduler is not None:
                scheduler.step()

    def _mean_over_ranks(self, metrics: Dict[str, float]) -> Dict[str, float]:
        if not self.dist.enabled:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        self.dist.all_reduce_mean_([values])
        return dict(zip(keys, values.tolist()))

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue this run exactly: model, optimizers, φ, schedulers, gradient scalers and
        accumulated gradients, counters, metrics so far, the weight history (or, with ``log_dir``, how much of it
        the files hold), callback states and, per rank, the RNG states and loader positions (a collective call
        when distributed). See :class:`~metareweight.checkpoint.Checkpointer`."""
        return self._checkpointer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into this trainer (built with the same model, data and options). It is checked
        first: a mismatch raises :class:`~metareweight.checkpoint.CheckpointError` and changes nothing."""
        self._checkpointer.load_state_dict(state)

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None) -> Optional[Path]:
        """Write :meth:`state_dict` atomically to ``path`` (default ``checkpoint_dir/last.pt``, the one it replaces
        kept as ``prev.pt``); rank 0 writes, every rank must call it. Returns the path on rank 0."""
        return self._checkpointer.save(path)

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (every rank reads the same file); an unreadable
        ``last.pt`` falls back to ``prev.pt`` beside it, with a warning naming both."""
        self._checkpointer.load(path)

    def evaluate(self, loader: Iterable) -> Dict[str, float]:
        """The model's mean loss on ``loader`` (the objective's ``loss_fn`` if it has one) and, for class targets, its
        accuracy: :func:`~metareweight.evaluation.evaluate`."""
        return evaluate(self.model, loader, precision=self.precision, collectives=self.dist,
                        loss_fn=getattr(self.objective, "loss_fn", None))


for _name in STEP_ATTRIBUTES:
    setattr(MetaTrainer, _name, _on_step(_name))
