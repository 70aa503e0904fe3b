"""``MetaTrainer``: the bilevel training loop around a user's own model, optimizer and DataLoader.

The trainer is a loop around :class:`~metareweight.MetaStep`, which does the work of one step (virtual steps,
hypergradient, meta step, real step; see :mod:`metareweight.step`). The loop groups train batches by
``unroll_steps``, makes every ``meta_interval``-th group a meta step (the others are plain weighted steps with the
current φ), draws meta batches, and runs epochs, evaluation, schedulers, callbacks, checkpoints and the weight
history: every weight used is recorded in :attr:`MetaTrainer.weights_history`, keyed by sample index.

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

import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .callbacks import Callback, JsonlLogger
from .core.hypergrad import HypergradMethod
from .core.problem import BilevelProblem, HypergradResult
from .data.batch import Batch, as_batch
from .data.indexed import check_index
from .history import DEFAULT_KEEP, STREAM_DIR, WeightHistory, read_stream, save_arrays
from .losses import cross_entropy_terms, mse_terms
from .meta_data import MetaStream, meta_source
from .metrics import auroc
from .models import model_forward
from .objectives.base import MetaObjective
from .progress import EpochLine, is_tty
from .step import MetaStep
from .validation import validate_trainer_args

SCHEDULER_INTERVALS = ("epoch", "step")
_COUNTERS = ("global_step", "meta_steps", "epoch", "groups_seen", "_accumulated", "_meta_accumulated",
             "_fit_start_epoch", "_last_checkpoint_step")


def _group_columns(batch: Batch) -> Dict[str, torch.Tensor]:
    """Per-sample integer/bool fields of a batch worth keeping beside the weights (noise flags, domains, class)."""
    out = {}
    n = batch.size
    if torch.is_tensor(batch.targets) and batch.targets.dim() == 1 and not batch.targets.dtype.is_floating_point:
        out["target"] = batch.targets
    for k, v in batch.extras.items():
        if torch.is_tensor(v) and v.dim() == 1 and v.shape[0] == n and not v.dtype.is_floating_point:
            out[k] = v
    return out


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
    """

    method = _on_step("method")
    meta_optimizer = _on_step("meta_optimizer")
    precision = _on_step("precision")
    functional_optimizer = _on_step("functional_optimizer")
    real_step = _on_step("real_step")
    adam_preconditioner = _on_step("adam_preconditioner")
    grad_clip = _on_step("grad_clip")
    meta_grad_clip = _on_step("meta_grad_clip")
    accumulate_steps = _on_step("accumulate_steps")
    meta_accumulate_steps = _on_step("meta_accumulate_steps")
    global_step = _on_step("global_step")
    meta_steps = _on_step("meta_steps")
    _accumulated = _on_step("accumulated")
    _meta_accumulated = _on_step("meta_accumulated")
    scheduler = _scheduler("scheduler")
    meta_scheduler = _scheduler("meta_scheduler")

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
        args = validate_trainer_args(locals())  # every check that can be made before training (one place)
        meta_interval, unroll_steps = args["meta_interval"], args["unroll_steps"]
        accumulate_steps, meta_accumulate_steps = args["accumulate_steps"], args["meta_accumulate_steps"]
        checkpoint_every, grad_clip, meta_grad_clip = args["checkpoint_every"], args["grad_clip"], args["meta_grad_clip"]
        self.dist = dist_utils.resolve(distributed)
        self.stepper = MetaStep(
            model, optimizer, objective, hypergrad, meta_optimizer, hypergrad_options=hypergrad_options,
            unroll_steps=unroll_steps, real_step=real_step, adam_preconditioner=adam_preconditioner,
            grad_clip=grad_clip, meta_grad_clip=meta_grad_clip, accumulate_steps=accumulate_steps,
            meta_accumulate_steps=meta_accumulate_steps, precision=precision, collectives=self.dist,
            record=self._record)
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.train_loader = train_loader
        self.device = self.stepper.device
        self.meta_interval, self.unroll_steps = meta_interval, unroll_steps
        self.scheduler_interval = scheduler_interval
        self._schedulers: Dict[str, Any] = {}
        self.scheduler, self.meta_scheduler = scheduler, meta_scheduler
        self.noisy = None if noisy is None else np.asarray(noisy, bool)
        self.eval_loader = eval_loader
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.callbacks: List[Callback] = list(callbacks)
        if health:  # before the loggers: they stay last
            from .health import HealthMonitor
            self.callbacks.append(HealthMonitor())
        if self.log_dir is not None:
            self.callbacks.append(JsonlLogger(self.log_dir / "metrics.jsonl"))
        if logger is not None:
            self.callbacks.append(self._make_logger(logger))
        self.meta_stream = MetaStream(meta_source(objective, train_loader, meta_loader))
        self._train_position = ckpt.LoaderPosition(train_loader)
        self._epoch_sums: Dict[str, List[float]] = {}

        self.weights_history = WeightHistory(keep=history)
        if self.log_dir is not None:
            self.weights_history.stream_to(self.log_dir / STREAM_DIR, write=self.dist.is_main)  # rank 0 writes
        self._checkpointer = ckpt.Checkpointer(self, _COUNTERS)
        self.epoch = 0
        self.groups_seen = 0
        self._fit_start_epoch = 0
        self._last_checkpoint_step = 0
        self.history: List[Dict[str, float]] = []

    # ---- set-up helpers -------------------------------------------------------------------------------------
    def _make_logger(self, logger: Union[str, Callback]) -> Callback:
        """``"wandb"`` (offline), ``"tensorboard"`` (event files in ``log_dir``, else ``runs/``) or a Callback."""
        if logger == "wandb":
            from .wandb_logger import WandbLogger
            return WandbLogger(dir=self.log_dir or ".")
        if logger == "tensorboard":
            from .tensorboard_logger import TensorBoardLogger
            return TensorBoardLogger(self.log_dir or "runs")
        if isinstance(logger, str) or not hasattr(logger, "on_step_end"):
            raise ValueError(f"logger must be 'wandb' or a Callback (or 'tensorboard'), got {logger!r} (JSONL "
                             "logging is switched on by log_dir)")
        return logger

    def _active_callbacks(self) -> List[Callback]:
        """The callbacks this process runs: loggers only on rank 0."""
        return [cb for cb in self.callbacks if self.dist.is_main or not getattr(cb, "main_process_only", False)]

    def build_problem(self, batches: Sequence[Batch], meta_batch: Batch) -> BilevelProblem:
        """The bilevel problem of a meta step at the current parameters (:meth:`MetaStep.build_problem`)."""
        return self.stepper.build_problem(batches, meta_batch)

    def _commit(self, result: HypergradResult, batches: Sequence[Batch]) -> float:
        return self.stepper.commit(result, batches)

    def _refresh_functional_optimizer(self) -> None:
        """A no-op kept for old callers: virtual steps mirror the optimizer's current hyper-parameters."""

    # ---- the loop -------------------------------------------------------------------------------------------
    def fit(self, epochs: int = 1, max_steps: Optional[int] = None,
            resume: Union[bool, str, Path] = False) -> List[Dict[str, float]]:
        """Train for ``epochs`` epochs (or until ``max_steps`` real steps in all). Returns the per-epoch metrics.

        Args:
            resume: ``True`` continues from ``checkpoint_dir/last.pt`` if it exists (and starts afresh if not);
                a path continues from that checkpoint. ``epochs`` then counts from the epoch at which the
                interrupted ``fit`` call began, so relaunching the same command finishes the same run.
        """
        from .validation import validate_fit_args
        epochs, max_steps = validate_fit_args(epochs, max_steps, resume)
        resumed = self._resume(resume)
        if not resumed:
            self._fit_start_epoch = self.epoch
        try:
            self._fit_epochs(epochs, max_steps, resumed)
        finally:  # what was logged is written also when training fails
            self._write_weights()
        for cb in self._active_callbacks():
            cb.on_fit_end(self)
        return self.history

    def _fit_epochs(self, epochs: int, max_steps: Optional[int], resumed: bool) -> None:
        dist_utils.check_loaders_agree(self.train_loader, getattr(self.meta_stream, "loader", None), self.dist)
        if not resumed:
            self._sync_replicas()
        for cb in self._active_callbacks():
            cb.on_fit_start(self)
        while self.epoch < self._fit_start_epoch + epochs:
            if max_steps is not None and self.global_step >= max_steps:
                break
            metrics = self._fit_epoch(max_steps)
            self.history.append(metrics)
            for cb in self._active_callbacks():
                cb.on_epoch_end(self, metrics)
            self.epoch += 1
            self._step_schedulers()
            if self.checkpoint_dir is not None and not self._checkpointer.saved_at_this_step():
                self.save_checkpoint()  # one write per step: a save at the epoch's last step resumes into its end
            self.weights_history.flush()

    def _write_weights(self) -> None:
        """``log_dir/weights.npz``: the whole streamed history (rank 0)."""
        if self.log_dir is None or not self.dist.is_main or self.weights_history.total == 0:
            return  # nothing recorded: an earlier run's weights.npz in the same log_dir stays as it is
        self.weights_history.flush()
        arrays = read_stream(self.log_dir / STREAM_DIR)
        if arrays:
            save_arrays(arrays, self.log_dir / "weights.npz")

    def _fit_epoch(self, max_steps: Optional[int]) -> Dict[str, float]:
        if not self._train_position.active:  # a resumed run continues its epoch in progress
            self._train_position.start(epoch=self.epoch)
            self._epoch_sums = {}
        bar = self._progress_bar()
        pending: List[Batch] = []
        for raw in self._train_position:
            pending.append(as_batch(raw).to(self.device))
            if len(pending) == self.unroll_steps:
                self._end_group(pending, bar)
                pending = []
                if max_steps is not None and self.global_step >= max_steps:
                    break
        else:
            if pending:
                self._end_group(pending, bar)
        if self._train_position.consumed == 0:
            raise ValueError("the train loader yielded no batches")
        self._train_position.stop()
        if bar is not None:
            bar.close()
        self.stepper.flush()
        out = {k: float(np.nanmean(v)) for k, v in self._epoch_sums.items() if k not in ("step", "epoch")}
        out.update(epoch=self.epoch, step=self.global_step, meta_steps=self.meta_steps)
        out.update(self._weight_summary())
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
            self._epoch_sums.setdefault(k, []).append(float(v))
        for cb in self._active_callbacks():
            cb.on_step_end(self, metrics)
        if bar is not None:
            bar.update(len(batches))
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("train_loss", "meta_loss")})
        every = self.checkpoint_every
        if every and self.global_step // every > self._last_checkpoint_step // every:
            self.save_checkpoint()

    def _step_schedulers(self) -> None:
        if self.scheduler_interval != "epoch":
            return
        if self.meta_scheduler is not None:
            self.meta_scheduler.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def _mean_over_ranks(self, metrics: Dict[str, float]) -> Dict[str, float]:
        if not self.dist.enabled:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        self.dist.all_reduce_mean_([values])
        return dict(zip(keys, values.tolist()))

    def _sync_replicas(self) -> None:
        """Start every rank from rank 0's parameters, buffers and meta-parameters (as DDP does)."""
        self.dist.broadcast_([*self.model.parameters(), *self.model.buffers(), *self.objective.parameters(),
                              *self.objective.buffers()])

    # ---- weights and progress (the weight history's owner rewrites these) ------------------------------
    def _record(self, batch: Batch, weights: torch.Tensor) -> None:
        """Record the weights of the *global* batch (gathered from every rank when distributed)."""
        check_index(batch, self.noisy is not None)
        columns = {"index": batch.index, "weight": weights.detach().float(), **_group_columns(batch)}
        if self.noisy is not None and batch.index is not None and "noisy" not in columns:
            index = batch.index.detach().cpu().numpy()
            if index.size and (index.min() < 0 or index.max() >= len(self.noisy)):
                raise ValueError(f"a batch holds sample index {int(index.max())} but noisy= has {len(self.noisy)} "
                                 "flags; give one flag per training sample, in dataset-index order")
            columns["noisy"] = torch.as_tensor(self.noisy[index])
        if self.dist.enabled:
            parts = self.dist.gather_object({k: (None if v is None else v.cpu()) for k, v in columns.items()})
            columns = {k: (None if any(p.get(k) is None for p in parts) else torch.cat([p[k] for p in parts]))
                       for k in columns}
        index, weight = columns.pop("index"), columns.pop("weight")
        groups = {k: v for k, v in columns.items() if v is not None}
        self.weights_history.record(self.global_step, self.epoch, index, weight, **groups)

    def _progress_bar(self) -> Any:
        """A tqdm bar on a terminal; where stderr is not a TTY (a pipe, a log file, CI), one line per epoch."""
        if not self.progress or not self.dist.is_main:
            return None
        try:
            total = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if not is_tty(sys.stderr):
            return EpochLine(f"epoch {self.epoch}", total, self._train_position.consumed)
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=self._train_position.consumed, desc=f"epoch {self.epoch}", leave=False,
                    dynamic_ncols=True)

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

    def _resume(self, resume: Union[bool, str, Path]) -> bool:
        return self._checkpointer.resume(resume)

    def _weight_summary(self) -> Dict[str, float]:
        """The epoch's weight statistics: mean, spread and, with noise flags (``noisy=`` or a ``noisy`` field of
        the batches), the clean and noisy means and the weight AUROC of clean against noisy."""
        latest = self.weights_history.latest(epoch=self.epoch)
        if latest["weight"].size == 0:
            return {}
        w = latest["weight"]
        out = {"weight_mean": float(w.mean()), "weight_std": float(w.std())}
        flags = None
        if "noisy" in latest and (latest["noisy"] >= 0).all():
            flags = latest["noisy"].astype(bool)
        elif self.noisy is not None and (latest["index"] >= 0).all() and latest["index"].max() < len(self.noisy):
            flags = self.noisy[latest["index"]]
        elif self.noisy is not None and not getattr(self, "_warned_no_index", False):
            self._warned_no_index = True
            import warnings
            warnings.warn("noisy= was given but the batches carry no sample index, so the weights cannot be matched "
                          "to the flags (no weight_auroc); yield (inputs, targets, index) or use "
                          "TensorIndexedDataset", RuntimeWarning, stacklevel=2)
        if flags is not None:
            out["weight_clean"] = float(w[~flags].mean()) if (~flags).any() else math.nan
            out["weight_noisy"] = float(w[flags].mean()) if flags.any() else math.nan
            out["weight_auroc"] = auroc(w, ~flags)
        return out

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> Dict[str, float]:
        """The model's mean loss on ``loader`` and, for class targets, its accuracy.

        The loss is the objective's own ``loss_fn`` when it has one (e.g. a squared error for regression), else
        cross-entropy for integer class targets and the squared error (:func:`~metareweight.losses.mse_terms`)
        for float targets; ``accuracy`` is reported only for integer targets and ``(batch, classes)`` outputs.
        Batches and outputs follow the training conventions (dict inputs, Hugging Face ``ModelOutput``; see
        :mod:`metareweight.models`). Samples without targets count in neither.
        """
        was_training = self.model.training
        self.model.eval()
        forward = self.precision.wrap(model_forward(self.model))
        custom = getattr(self.objective, "loss_fn", None)
        # samples seen, labelled samples, their loss sum, samples with class targets, correct ones
        seen, labelled, loss_sum, classified, correct = 0, 0, 0.0, 0, 0
        try:
            for raw in loader:
                batch = as_batch(raw).to(self.device)
                out = forward(batch.inputs)
                seen += batch.size
                if batch.targets is None:
                    continue
                y = batch.targets
                classes = (torch.is_tensor(out) and out.dim() == 2 and out.shape[1] >= 2 and y.dim() == 1
                           and not y.dtype.is_floating_point)
                loss_fn = custom or (cross_entropy_terms if classes else mse_terms)
                loss_sum += float(loss_fn(out, y).double().sum())
                labelled += batch.size
                if classes:
                    classified += batch.size
                    correct += int((out.argmax(1) == y).sum())
        finally:
            self.model.train(was_training)
        if self.dist.enabled and isinstance(getattr(loader, "sampler", None), DistributedSampler):
            sums = torch.tensor([seen, labelled, loss_sum, classified, correct], dtype=torch.float64,
                                device=self.device)
            dist_utils.all_reduce_mean_([sums], self.dist)  # a sharded eval set: combine the ranks' sums
            seen, labelled, loss_sum, classified, correct = (float(v) * self.dist.world_size for v in sums)
        if seen == 0:
            raise ValueError("the evaluation loader yielded no samples")
        if labelled == 0:
            raise ValueError("the evaluation batches carry no targets; evaluate needs labelled data")
        out = {"loss": loss_sum / labelled}
        if classified:
            out["accuracy"] = correct / classified
        return out
