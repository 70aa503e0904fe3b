"""``MetaTrainer``: the bilevel training loop around a user's own model, optimizer and DataLoader.

Each step takes a train batch. Every ``meta_interval``-th group of ``unroll_steps`` batches is a *meta step*:

1. build the :class:`~metareweight.core.BilevelProblem` from the current θ, the optimizer's state, φ and a meta batch;
2. the hypergradient method returns ``dL_out/dφ``; the meta optimizer updates φ;
3. the real step: ``real_step="recompute"`` (Meta-Weight-Net) re-weights the same batches with the updated φ and
   steps the user's optimizer; ``"lookahead"`` commits the method's virtual parameters and optimizer state
   (the self-taught rescaler's "the inner step is the real step").

Other steps are plain weighted steps with the current φ. Every weight used is recorded in
:attr:`MetaTrainer.weights_history`, keyed by sample index.

Production concerns live in their own modules and are switched on by arguments: ``distributed``
(:mod:`metareweight.distributed`), ``precision`` (:mod:`metareweight.precision`), ``checkpoint_dir`` /
``fit(resume=True)`` (:mod:`metareweight.checkpoint`), ``logger="wandb"`` (:mod:`metareweight.wandb_logger`);
``accumulate_steps``/``meta_accumulate_steps`` and ``grad_clip``/``meta_grad_clip`` shape the two optimizer steps.

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

import io
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .callbacks import Callback, JsonlLogger
from .core.hypergrad import HypergradMethod, get_hypergradient
from .core.optim import FunctionalOptimizer
from .core.problem import BilevelProblem, HypergradResult
from .data.batch import Batch, as_batch
from .history import WeightHistory
from .losses import ensure_finite
from .metrics import auroc
from .objectives.base import META_DATA_SOURCES, MetaObjective
from .precision import Precision

REAL_STEPS = ("recompute", "lookahead")
SCHEDULER_INTERVALS = ("epoch", "step")
_COUNTERS = ("global_step", "meta_steps", "epoch", "groups_seen", "_accumulated", "_meta_accumulated",
             "_fit_start_epoch", "_last_checkpoint_step")


class _MetaStream:
    """Endless meta batches from a loader, restarting it when exhausted; an empty loader is an error.
    Each pass is an "epoch" of the loader's sampler; the position is saved in checkpoints."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.position = ckpt.LoaderPosition(loader)
        self.passes = 0

    def next(self) -> Batch:
        for attempt in range(2):
            if not self.position.active:
                self.position.start(epoch=self.passes)
                self.passes += 1
            try:
                return as_batch(next(self.position))
            except StopIteration:
                pass
        raise ValueError("the meta loader yielded no batches; give it at least one sample "
                         "(check its dataset size and drop_last)")

    def state_dict(self) -> Dict[str, Any]:
        return {"position": self.position.state_dict(), "passes": self.passes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.passes = state["passes"]
        self.position.load_state_dict(state["position"])


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


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _EpochLine:
    """The progress bar's stand-in off a terminal: it keeps tqdm's ``update``/``set_postfix``/``close`` calls and
    prints one line when the epoch ends (``epoch 3: 20/20 steps, train_loss 0.412, meta_loss 0.523, 1.3 s``)."""

    def __init__(self, desc: str, total: Optional[int], initial: int = 0, stream: Any = None):
        self.desc, self.total, self.n = desc, total, initial
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: Dict[str, str] = {}
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, postfix: Mapping[str, Any]) -> None:
        self.postfix = {k: str(v) for k, v in postfix.items()}

    def close(self) -> None:
        steps = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        parts = [f"{self.desc}: {steps} steps", *(f"{k} {v}" for k, v in self.postfix.items()),
                 f"{time.perf_counter() - self.start:.1f} s"]
        print(", ".join(parts), file=self.stream, flush=True)


class MetaTrainer:
    """Meta-learned sample reweighting around your model, optimizer and DataLoader.

    Args:
        model: the ``nn.Module`` to train (kept as is; virtual steps never modify it).
        optimizer: its ``torch.optim`` optimizer (SGD, Adam or AdamW); its state is used by the virtual steps.
        train_loader: yields ``(x, y)``, ``(x, y, index)`` or dicts (see :func:`~metareweight.data.as_batch`).
        objective: a :class:`~metareweight.objectives.MetaObjective` (its parameters are φ).
        meta_loader: meta batches; required when ``objective.meta_data == "loader"``.
        hypergrad: a method name (``"unrolled"``, ``"finite_difference"``, ``"neumann"``, ...) or instance.
        hypergrad_options: options for a named method, e.g. ``{"terms": 20}`` for Neumann.
        meta_optimizer: optimizer over ``objective.meta_parameters()``; default from the objective.
        meta_interval: meta update every ``meta_interval`` groups of ``unroll_steps`` batches (>= 1).
        unroll_steps: inner steps per meta step (>= 1).
        real_step: ``"recompute"`` or ``"lookahead"`` (see module docs).
        adam_preconditioner: ``"differentiable"`` or ``"fixed"`` (treat Adam's denominator as constant).
        noisy: optional boolean flags per dataset index (True = corrupted); enables the weight AUROC.
        eval_loader: evaluated at the end of each epoch.
        callbacks: extra :class:`~metareweight.callbacks.Callback` objects.
        log_dir: if given, metrics go to ``log_dir/metrics.jsonl`` and weights to ``log_dir/weights.npz``.
        grad_clip: max gradient norm for the real step (None: no clipping).
        meta_grad_clip: max norm of the hypergradient before the meta optimizer steps (None: no clipping).
        accumulate_steps: the model's optimizer steps once every ``accumulate_steps`` real steps on the mean of
            their gradients (needs ``real_step="recompute"``; a partial window is applied at the epoch's end).
        meta_accumulate_steps: the meta optimizer steps once every ``meta_accumulate_steps`` meta steps on the mean
            of their hypergradients. As in every accumulation scheme, each virtual step still looks ahead from one
            micro-batch.
        precision: ``"fp32"``, ``"bf16"`` (autocast on CPU and GPU) or ``"fp16"`` (GPU, with gradient scalers);
            see :mod:`metareweight.precision`.
        distributed: ``"auto"`` (use an initialised ``torch.distributed`` process group), ``True`` (require one),
            ``False``, or a :class:`~metareweight.distributed.DistributedContext`; see
            :mod:`metareweight.distributed`. Each rank's loaders must yield its shard
            (:func:`~metareweight.distributed.distributed_sampler`).
        scheduler, meta_scheduler: optional learning-rate schedulers of ``optimizer`` / the meta optimizer,
            stepped once per epoch or, with ``scheduler_interval="step"``, after every step of their optimizer.
        checkpoint_dir: where :meth:`save_checkpoint` writes ``last.pt`` (rank 0, atomically): every
            ``checkpoint_every`` real steps and at the end of every epoch. ``fit(resume=True)`` continues from it.
        checkpoint_every: real steps between mid-epoch checkpoints (None: only at epoch ends).
        logger: ``"wandb"`` (an offline :class:`~metareweight.wandb_logger.WandbLogger` in ``log_dir``),
            ``"tensorboard"`` (a :class:`~metareweight.tensorboard_logger.TensorBoardLogger` writing to ``log_dir``,
            or ``runs/`` without one) or any callback; JSONL is always written when ``log_dir`` is set.
        progress: show progress: a tqdm bar on a terminal, one line per epoch on stderr otherwise (a pipe or
            a log file stays small).
    """

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
                 distributed: Union[str, bool, "dist_utils.DistributedContext"] = "auto", scheduler: Any = None, meta_scheduler: Any = None,
                 scheduler_interval: str = "epoch", checkpoint_dir: Optional[Union[str, Path]] = None,
                 checkpoint_every: Optional[int] = None, logger: Union[None, str, Callback] = None,
                 progress: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters; there is nothing to train")
        if not isinstance(objective, MetaObjective):
            raise TypeError(f"objective must be a MetaObjective (e.g. MetaWeightNet()), got {type(objective).__name__}")
        for name, value in (("meta_interval", meta_interval), ("unroll_steps", unroll_steps),
                            ("accumulate_steps", accumulate_steps), ("meta_accumulate_steps", meta_accumulate_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if real_step not in REAL_STEPS:
            raise ValueError(f"real_step must be one of {REAL_STEPS}, got {real_step!r}")
        if objective.meta_data not in META_DATA_SOURCES:
            raise ValueError(f"{type(objective).__name__}.meta_data must be one of {META_DATA_SOURCES}")
        for name, value in (("grad_clip", grad_clip), ("meta_grad_clip", meta_grad_clip)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if accumulate_steps > 1 and real_step == "lookahead":
            raise ValueError("accumulate_steps > 1 needs real_step='recompute': with 'lookahead' the virtual step "
                             "is committed as the real step, so there is no gradient to accumulate")
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {scheduler_interval!r}")
        if checkpoint_every is not None and (checkpoint_dir is None or not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be an integer >= 1 and needs checkpoint_dir, got "
                             f"checkpoint_every={checkpoint_every!r}, checkpoint_dir={checkpoint_dir!r}")

        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.objective = objective
        self.device = next(model.parameters()).device
        self.objective.to(self.device)
        self.dist = dist_utils.resolve(distributed)
        self.precision = Precision(precision, self.device)
        self.adam_preconditioner = adam_preconditioner
        self.functional_optimizer = FunctionalOptimizer.from_torch(optimizer, model, adam_preconditioner)
        self.method = get_hypergradient(hypergrad, hypergrad_options) if objective.uses_hypergradient else None
        self.meta_optimizer = meta_optimizer or (objective.make_meta_optimizer()
                                                 if objective.meta_parameters() else None)
        self.meta_interval = meta_interval
        self.unroll_steps = unroll_steps
        self.real_step = real_step
        self.noisy = None if noisy is None else np.asarray(noisy, bool)
        self.eval_loader = eval_loader
        self.grad_clip = grad_clip
        self.meta_grad_clip = meta_grad_clip
        self.accumulate_steps = accumulate_steps
        self.meta_accumulate_steps = meta_accumulate_steps
        self.scheduler = scheduler
        self.meta_scheduler = meta_scheduler
        self.scheduler_interval = scheduler_interval
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.callbacks: List[Callback] = list(callbacks)
        if self.log_dir is not None:
            self.callbacks.append(JsonlLogger(self.log_dir / "metrics.jsonl"))
        if logger is not None:
            self.callbacks.append(self._make_logger(logger))
        self.meta_stream = _MetaStream(self._meta_source(meta_loader))
        self._train_position = ckpt.LoaderPosition(train_loader)
        self._epoch_sums: Dict[str, List[float]] = {}

        self.weights_history = WeightHistory()
        self.global_step = 0
        self.meta_steps = 0
        self.epoch = 0
        self.groups_seen = 0
        self._accumulated = 0  # real steps whose gradients wait for the optimizer
        self._meta_accumulated = 0
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

    def _meta_source(self, meta_loader: Optional[Iterable]) -> Iterable:
        if meta_loader is not None:
            return meta_loader
        if self.objective.meta_data == "loader":
            raise ValueError(f"{type(self.objective).__name__} needs a meta_loader (its meta batches come from "
                             "separate meta data)")
        loader = self.train_loader
        if not isinstance(loader, DataLoader):
            raise ValueError("meta batches sampled from the training set need train_loader to be a DataLoader")
        sampler = RandomSampler(loader.dataset, replacement=True, num_samples=10 ** 9)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                          collate_fn=loader.collate_fn, num_workers=0)

    # ---- one step -------------------------------------------------------------------------------------------
    def _record(self, batch: Batch, weights: torch.Tensor) -> None:
        """Record the weights of the *global* batch (gathered from every rank when distributed)."""
        columns = {"index": batch.index, "weight": weights.detach().float(), **_group_columns(batch)}
        if self.dist.enabled:
            parts = self.dist.gather_object({k: (None if v is None else v.cpu()) for k, v in columns.items()})
            columns = {k: (None if any(p.get(k) is None for p in parts) else torch.cat([p[k] for p in parts]))
                       for k in columns}
        index, weight = columns.pop("index"), columns.pop("weight")
        groups = {k: v for k, v in columns.items() if v is not None}
        self.weights_history.record(self.global_step, self.epoch, index, weight, **groups)

    def _train_mode(self) -> None:
        """``model.train()``, skipped when every module already trains (setting the flags costs more than checking)."""
        if not all(m.training for m in self.model.modules()):
            self.model.train()

    def _real_step(self, batch: Batch) -> float:
        self._train_mode()
        if self._accumulated == 0:
            self.optimizer.zero_grad(set_to_none=True)
        wt = self._replayed(batch)
        if wt is None:
            wt = self.objective.inner_terms(self.precision.wrap(self.model), batch)
            loss = (wt.weights.detach() * wt.terms).sum()
            ensure_finite(loss.detach(), f"the training loss at step {self.global_step}")
            self.precision.backward(loss / self.accumulate_steps)
        self._accumulated += 1
        if self._accumulated == self.accumulate_steps:
            self._optimizer_step()
        self._record(batch, wt.sample_weights())
        self.global_step += 1
        return float(wt.terms.detach().double().mean())

    def _replayed(self, batch: Batch):
        """Add the real step's gradient from the meta step's per-layer captures (``hypergrad="fast"``) when the
        method kept them and the parameters have not changed since. Returns the batch's terms, or None."""
        replay = getattr(self.method, "replay", None)
        out = replay(batch) if replay is not None and self.precision.mode == "fp32" else None
        if out is None:
            return None
        wt, grads = out
        ensure_finite((wt.weights * wt.terms).sum(), f"the training loss at step {self.global_step}")
        for name, p in self.model.named_parameters():
            if grads.get(name) is not None:
                g = grads[name] if self.accumulate_steps == 1 else grads[name] / self.accumulate_steps
                p.grad = g if p.grad is None else p.grad + g
        return wt

    def _optimizer_step(self) -> None:
        """Average gradients across ranks, then unscale (fp16), clip, step and schedule."""
        params = [p for p in self.model.parameters() if p.requires_grad] \
            if self.dist.enabled or self.grad_clip is not None else []  # only averaging and clipping need them
        dist_utils.all_reduce_mean_([p.grad for p in params], self.dist)
        Precision.step(self.optimizer, params, self.precision.scaler, self.grad_clip)
        self._accumulated = 0
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
            self._refresh_functional_optimizer()

    def _apply_hypergradient(self, grads: Sequence[torch.Tensor]) -> None:
        """Average the hypergradient across ranks, accumulate it in ``.grad`` and step φ when a window is full."""
        params = self.objective.meta_parameters()
        if self.precision.meta_scaler is None:  # with fp16 the scaler skips steps with inf/NaN instead
            for g in grads:
                ensure_finite(g, "the hypergradient")
        grads = [g.detach().to(p.dtype) / self.meta_accumulate_steps for p, g in zip(params, grads)]
        dist_utils.all_reduce_mean_(grads, self.dist)
        for p, g in zip(params, grads):
            p.grad = g if self._meta_accumulated == 0 or p.grad is None else p.grad + g
        self._meta_accumulated += 1
        if self._meta_accumulated == self.meta_accumulate_steps:
            self._meta_optimizer_step()

    def _meta_optimizer_step(self) -> None:
        """Unscale (fp16), clip and step φ, then the per-step meta scheduler."""
        Precision.step(self.meta_optimizer, self.objective.meta_parameters(), self.precision.meta_scaler,
                       self.meta_grad_clip)
        self._meta_accumulated = 0
        if self.meta_scheduler is not None and self.scheduler_interval == "step":
            self.meta_scheduler.step()

    def _flush_accumulation(self) -> None:
        """Apply a partial accumulation window (at the end of an epoch), schedulers included."""
        if self._accumulated:
            self._optimizer_step()
        if self._meta_accumulated:
            self._meta_optimizer_step()

    def _step_schedulers(self) -> None:
        if self.scheduler_interval != "epoch":
            return
        if self.meta_scheduler is not None:
            self.meta_scheduler.step()
        if self.scheduler is not None:
            self.scheduler.step()
            self._refresh_functional_optimizer()

    def _refresh_functional_optimizer(self) -> None:
        """Re-read the optimizer's hyper-parameters (a scheduler changed the learning rate)."""
        self.functional_optimizer = FunctionalOptimizer.from_torch(self.optimizer, self.model,
                                                                   self.adam_preconditioner)

    def _inner_optimizer(self) -> FunctionalOptimizer:
        """The functional optimizer of virtual steps: synchronised across ranks when distributed."""
        if self.dist.enabled:
            return dist_utils.SyncedFunctionalOptimizer(self.functional_optimizer, self.dist)
        return self.functional_optimizer

    def build_problem(self, batches: Sequence[Batch], meta_batch: Batch) -> BilevelProblem:
        """The bilevel problem of a meta step at the current parameters (useful for custom loops and tests)."""
        return BilevelProblem(
            model=self.model,
            params={k: v.detach() for k, v in self.model.named_parameters()},
            buffers={k: v.detach() for k, v in self.model.named_buffers()},
            optimizer=self._inner_optimizer(),
            opt_state=self.functional_optimizer.read_state(),
            meta_params=self.objective.meta_parameters(),
            inner=self.precision.wrap_fn(self.objective.inner_terms),
            outer=self.precision.scale_outer(self.precision.wrap_fn(self.objective.outer_loss)),
            train_batches=list(batches),
            meta_batch=meta_batch,
        )

    def _commit(self, result: HypergradResult, batches: Sequence[Batch]) -> float:
        if result.lookahead is None:
            raise ValueError(f"hypergradient {self.method.name!r} does not return lookahead parameters; "
                             "use real_step='recompute'")
        # weights for the record and buffer updates (BatchNorm running stats) from a no-grad pass
        losses = []
        with torch.no_grad():
            self._train_mode()
            for batch in batches:
                wt = self.objective.inner_terms(self.precision.wrap(self.model), batch)
                self._record(batch, wt.sample_weights())
                losses.append(float(wt.terms.double().mean()))
                self.global_step += 1
            params, state = result.lookahead
            for name, p in self.model.named_parameters():
                if name in params:
                    p.copy_(params[name])
        self.functional_optimizer.write_state(state, self.model)
        return float(np.mean(losses))

    def _meta_step(self, batches: List[Batch]) -> Dict[str, float]:
        meta_batch = self.meta_stream.next().to(self.device)
        self._train_mode()
        if self.method is None:
            stats = self.objective.meta_step(self, batches, meta_batch)
            self.meta_steps += 1
            self.global_step += len(batches)  # the objective's own update consumed these train batches
            return stats
        result = self.method(self.build_problem(batches, meta_batch))
        meta_loss = result.outer_loss / self.precision.meta_scale()
        self._apply_hypergradient(result.grads)
        self.meta_steps += 1
        if self.real_step == "lookahead":
            train_loss = self._commit(result, batches)
        else:
            train_loss = float(np.mean([self._real_step(b) for b in batches]))
        return {"train_loss": train_loss, "meta_loss": meta_loss, **result.stats}

    def _run_group(self, batches: List[Batch]) -> Dict[str, float]:
        due = self.groups_seen % self.meta_interval == 0
        self.groups_seen += 1
        if due:
            return self._meta_step(batches)
        return {"train_loss": float(np.mean([self._real_step(b) for b in batches]))}

    # ---- public API -----------------------------------------------------------------------------------------
    def fit(self, epochs: int = 1, max_steps: Optional[int] = None,
            resume: Union[bool, str, Path] = False) -> List[Dict[str, float]]:
        """Train for ``epochs`` epochs (or until ``max_steps`` real steps in all). Returns the per-epoch metrics.

        Args:
            resume: ``True`` continues from ``checkpoint_dir/last.pt`` if it exists (and starts afresh if not);
                a path continues from that checkpoint. ``epochs`` then counts from the epoch at which the
                interrupted ``fit`` call began, so relaunching the same command finishes the same run.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        resumed = self._resume(resume)
        if not resumed:
            self._fit_start_epoch = self.epoch
        with dist_utils.reduction_scope(self.dist):
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
                if self.checkpoint_dir is not None:
                    self.save_checkpoint()
        if self.log_dir is not None and self.dist.is_main:
            self.weights_history.save(self.log_dir / "weights.npz")
        for cb in self._active_callbacks():
            cb.on_fit_end(self)
        return self.history

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
        self._flush_accumulation()
        out = {k: float(np.nanmean(v)) for k, v in self._epoch_sums.items() if k not in ("step", "epoch")}
        out.update(epoch=self.epoch, step=self.global_step, meta_steps=self.meta_steps)
        out.update(self._weight_summary())
        extra = self.objective.on_epoch_end(self, self.epoch)
        if extra:
            out.update(extra)
        if self.eval_loader is not None:
            out.update({f"eval_{k}": v for k, v in self.evaluate(self.eval_loader).items()})
        return out

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

    def _progress_bar(self) -> Any:
        """A tqdm bar on a terminal; where stderr is not a TTY (a pipe, a log file, CI), one line per epoch."""
        if not self.progress or not self.dist.is_main:
            return None
        try:
            total = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if not _is_tty(sys.stderr):
            return _EpochLine(f"epoch {self.epoch}", total, self._train_position.consumed)
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=self._train_position.consumed, desc=f"epoch {self.epoch}", leave=False,
                    dynamic_ncols=True)

    def _mean_over_ranks(self, metrics: Dict[str, float]) -> Dict[str, float]:
        if not self.dist.enabled:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist_utils.all_reduce_mean_([values], self.dist)
        return dict(zip(keys, values.tolist()))

    def _sync_replicas(self) -> None:
        """Start every rank from rank 0's parameters, buffers and meta-parameters (as DDP does)."""
        dist_utils.broadcast_([*self.model.parameters(), *self.model.buffers(), *self.objective.parameters(),
                               *self.objective.buffers()], self.dist)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue this run exactly: model, optimizers, φ, schedulers, gradient scalers and
        accumulated gradients, counters, metrics so far, the weight history, callback states and, per rank, the
        RNG states and loader positions (a collective call when distributed)."""
        local = {"rng": ckpt.rng_state(), "train": self._train_position.state_dict(),
                 "meta": self.meta_stream.state_dict()}
        history = None
        if len(self.weights_history):
            buf = io.BytesIO()
            np.savez(buf, **self.weights_history.arrays())
            history = buf.getvalue()
        optional = {"meta_optimizer": self.meta_optimizer, "scheduler": self.scheduler,
                    "meta_scheduler": self.meta_scheduler}
        return {
            "format": 1, "world_size": self.dist.world_size,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(), "precision": self.precision.state_dict(),
            **{k: (None if v is None else v.state_dict()) for k, v in optional.items()},
            "grads": {"model": [p.grad for p in self.model.parameters()],
                      "meta": [p.grad for p in self.objective.meta_parameters()]},
            "counters": {k: getattr(self, k) for k in _COUNTERS},
            "epoch_sums": self._epoch_sums, "history": self.history, "weights_history": history,
            "callbacks": [(type(cb).__qualname__, cb.state_dict() if hasattr(cb, "state_dict") else None)
                          for cb in self.callbacks],
            "per_rank": self.dist.gather_object(local),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into this trainer (built with the same model, data and options)."""
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError("not a metareweight checkpoint (expected what MetaTrainer.save_checkpoint writes)")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} process(es) but this run has "
                             f"{self.dist.world_size}; resume with the same number of processes (loader positions "
                             "and RNG streams are per rank)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.precision.load_state_dict(state["precision"])
        for name in ("meta_optimizer", "scheduler", "meta_scheduler"):
            mine = getattr(self, name)
            if (mine is None) != (state[name] is None):
                raise ValueError(f"the checkpoint {'has' if mine is None else 'lacks'} a {name}; build the trainer "
                                 "with the same optimizers and schedulers as the run that wrote it")
            if mine is not None:
                mine.load_state_dict(state[name])
        for params, grads in ((list(self.model.parameters()), state["grads"]["model"]),
                              (self.objective.meta_parameters(), state["grads"]["meta"])):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.device)
        for k, v in state["counters"].items():
            setattr(self, k, v)
        self._epoch_sums = state["epoch_sums"]
        self.history = list(state["history"])
        self.weights_history = (WeightHistory() if state["weights_history"] is None
                                else WeightHistory.load(io.BytesIO(state["weights_history"])))
        saved = list(state["callbacks"])  # matched by type, in order: callbacks may be added or removed
        for cb in self._active_callbacks():
            match = next((i for i, (kind, _) in enumerate(saved) if kind == type(cb).__qualname__), None)
            cb_state = None if match is None else saved.pop(match)[1]
            if cb_state is not None:
                cb.load_state_dict(cb_state)
        self._refresh_functional_optimizer()
        mine = state["per_rank"][self.dist.rank]
        self.meta_stream.load_state_dict(mine["meta"])  # these two replay their iterators' RNG states ...
        self._train_position.load_state_dict(mine["train"])
        ckpt.set_rng_state(mine["rng"])  # ... so the current state is restored last

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None) -> Optional[Path]:
        """Write :meth:`state_dict` atomically to ``path`` (default ``checkpoint_dir/last.pt``); rank 0 writes,
        every rank must call it. Returns the path on rank 0."""
        if path is None and self.checkpoint_dir is None:
            raise ValueError("save_checkpoint needs a path, or MetaTrainer(checkpoint_dir=...)")
        previous, self._last_checkpoint_step = self._last_checkpoint_step, self.global_step  # saved with the state
        try:
            state = self.state_dict()
            if not self.dist.is_main:
                return None
            return ckpt.atomic_save(state, Path(path) if path is not None else
                                    self.checkpoint_dir / ckpt.CHECKPOINT_NAME)
        except BaseException:
            self._last_checkpoint_step = previous
            raise

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (every rank reads the same file)."""
        self.load_state_dict(ckpt.load(path, map_location=self.device))

    def _resume(self, resume: Union[bool, str, Path]) -> bool:
        if resume is False or resume is None:
            return False
        if resume is True:
            if self.checkpoint_dir is None:
                raise ValueError("fit(resume=True) needs MetaTrainer(checkpoint_dir=...), or pass the checkpoint "
                                 "file: fit(resume='run/last.pt')")
            path = self.checkpoint_dir / ckpt.CHECKPOINT_NAME
            if not path.exists():
                return False
        else:
            path = Path(resume)
        self.load_checkpoint(path)
        return True

    def _weight_summary(self) -> Dict[str, float]:
        latest = self.weights_history.latest(epoch=self.epoch)
        if latest["weight"].size == 0:
            return {}
        out = {"weight_mean": float(latest["weight"].mean()), "weight_std": float(latest["weight"].std())}
        flags = None
        if self.noisy is not None and (latest["index"] >= 0).all():
            flags = self.noisy[latest["index"]]
        elif "noisy" in latest:
            flags = latest["noisy"].astype(bool)
        if flags is not None:
            w = latest["weight"]
            out["weight_clean"] = float(w[~flags].mean()) if (~flags).any() else math.nan
            out["weight_noisy"] = float(w[flags].mean()) if flags.any() else math.nan
            out["weight_auroc"] = auroc(w, ~flags)
        return out

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> Dict[str, float]:
        """Mean loss and accuracy of the model on ``loader`` (classification; accuracy needs integer targets)."""
        was_training = self.model.training
        self.model.eval()
        total, loss_sum, correct = 0, 0.0, 0
        for raw in loader:
            batch = as_batch(raw).to(self.device)
            out = self.precision.wrap(self.model)(batch.inputs)
            n = batch.size
            if batch.targets is not None and out.dim() == 2 and not batch.targets.dtype.is_floating_point:
                loss_sum += float(nn.functional.cross_entropy(out, batch.targets, reduction="sum"))
                correct += int((out.argmax(1) == batch.targets).sum())
            total += n
        self.model.train(was_training)
        if self.dist.enabled and isinstance(getattr(loader, "sampler", None), DistributedSampler):
            sums = torch.tensor([total, loss_sum, correct], dtype=torch.float64, device=self.device)
            dist_utils.all_reduce_mean_([sums], self.dist)  # a sharded eval set: combine the ranks' sums
            total, loss_sum, correct = (float(v) * self.dist.world_size for v in sums)
        if total == 0:
            raise ValueError("the evaluation loader yielded no samples")
        return {"loss": loss_sum / total, "accuracy": correct / total}
