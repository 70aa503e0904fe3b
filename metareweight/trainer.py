"""``MetaTrainer``: the bilevel training loop around a user's own model, optimizer and DataLoader.

Each step takes a train batch. Every ``meta_interval``-th group of ``unroll_steps`` batches is a *meta step*:

1. build the :class:`~metareweight.core.BilevelProblem` from the current θ, the optimizer's state, φ and a meta batch;
2. the hypergradient method returns ``dL_out/dφ``; the meta optimizer updates φ;
3. the real step: ``real_step="recompute"`` (Meta-Weight-Net) re-weights the same batches with the updated φ and
   steps the user's optimizer; ``"lookahead"`` commits the method's virtual parameters and optimizer state
   (the self-taught rescaler's "the inner step is the real step").

Other steps are plain weighted steps with the current φ. Every weight used is recorded in
:attr:`MetaTrainer.weights_history`, keyed by sample index.

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
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .callbacks import Callback, JsonlLogger
from .core.hypergrad import HypergradMethod, get_hypergradient
from .core.optim import FunctionalOptimizer
from .core.problem import BilevelProblem, HypergradResult
from .data.batch import Batch, as_batch
from .history import WeightHistory
from .losses import ensure_finite
from .metrics import auroc
from .objectives.base import META_DATA_SOURCES, MetaObjective

REAL_STEPS = ("recompute", "lookahead")


class _MetaStream:
    """Endless meta batches from a loader, restarting it when exhausted; an empty loader is an error."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self._it: Optional[Iterator] = None

    def next(self) -> Batch:
        for attempt in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return as_batch(next(self._it))
            except StopIteration:
                self._it = None
        raise ValueError("the meta loader yielded no batches; give it at least one sample "
                         "(check its dataset size and drop_last)")


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
        progress: show a tqdm progress bar.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable,
                 objective: MetaObjective, *, meta_loader: Optional[Iterable] = None,
                 hypergrad: Union[str, HypergradMethod] = "unrolled",
                 hypergrad_options: Optional[Mapping[str, Any]] = None,
                 meta_optimizer: Optional[torch.optim.Optimizer] = None, meta_interval: int = 1,
                 unroll_steps: int = 1, real_step: str = "recompute", adam_preconditioner: str = "differentiable",
                 noisy: Optional[Sequence[bool]] = None, eval_loader: Optional[Iterable] = None,
                 callbacks: Sequence[Callback] = (), log_dir: Optional[Union[str, Path]] = None,
                 grad_clip: Optional[float] = None, progress: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters; there is nothing to train")
        if not isinstance(objective, MetaObjective):
            raise TypeError(f"objective must be a MetaObjective (e.g. MetaWeightNet()), got {type(objective).__name__}")
        for name, value in (("meta_interval", meta_interval), ("unroll_steps", unroll_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if real_step not in REAL_STEPS:
            raise ValueError(f"real_step must be one of {REAL_STEPS}, got {real_step!r}")
        if objective.meta_data not in META_DATA_SOURCES:
            raise ValueError(f"{type(objective).__name__}.meta_data must be one of {META_DATA_SOURCES}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {grad_clip}")

        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.objective = objective
        self.device = next(model.parameters()).device
        self.objective.to(self.device)
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
        self.progress = progress
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.callbacks: List[Callback] = list(callbacks)
        if self.log_dir is not None:
            self.callbacks.append(JsonlLogger(self.log_dir / "metrics.jsonl"))
        self.meta_stream = _MetaStream(self._meta_source(meta_loader))

        self.weights_history = WeightHistory()
        self.global_step = 0
        self.meta_steps = 0
        self.epoch = 0
        self.groups_seen = 0
        self.history: List[Dict[str, float]] = []

    # ---- set-up helpers -------------------------------------------------------------------------------------
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
        self.weights_history.record(self.global_step, self.epoch, batch.index, weights, **_group_columns(batch))

    def _real_step(self, batch: Batch) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        wt = self.objective.inner_terms(self.model, batch)
        loss = (wt.weights.detach() * wt.terms).sum()
        ensure_finite(loss.detach(), f"the training loss at step {self.global_step}")
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self._record(batch, wt.sample_weights())
        self.global_step += 1
        return float(wt.terms.detach().mean())

    def build_problem(self, batches: Sequence[Batch], meta_batch: Batch) -> BilevelProblem:
        """The bilevel problem of a meta step at the current parameters (useful for custom loops and tests)."""
        return BilevelProblem(
            model=self.model,
            params={k: v.detach() for k, v in self.model.named_parameters()},
            buffers={k: v.detach() for k, v in self.model.named_buffers()},
            optimizer=self.functional_optimizer,
            opt_state=self.functional_optimizer.read_state(),
            meta_params=self.objective.meta_parameters(),
            inner=self.objective.inner_terms,
            outer=self.objective.outer_loss,
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
            self.model.train()
            for batch in batches:
                wt = self.objective.inner_terms(self.model, batch)
                self._record(batch, wt.sample_weights())
                losses.append(float(wt.terms.mean()))
                self.global_step += 1
            params, state = result.lookahead
            for name, p in self.model.named_parameters():
                if name in params:
                    p.copy_(params[name])
        self.functional_optimizer.write_state(state, self.model)
        return float(np.mean(losses))

    def _meta_step(self, batches: List[Batch]) -> Dict[str, float]:
        meta_batch = self.meta_stream.next().to(self.device)
        self.model.train()
        if self.method is None:
            stats = self.objective.meta_step(self, batches, meta_batch)
            self.meta_steps += 1
            self.global_step += len(batches)  # the objective's own update consumed these train batches
            return stats
        result = self.method(self.build_problem(batches, meta_batch))
        self.meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.objective.meta_parameters(), result.grads):
            ensure_finite(g, "the hypergradient")
            p.grad = g.detach().to(p.dtype)
        self.meta_optimizer.step()
        self.meta_steps += 1
        if self.real_step == "lookahead":
            train_loss = self._commit(result, batches)
        else:
            train_loss = float(np.mean([self._real_step(b) for b in batches]))
        return {"train_loss": train_loss, "meta_loss": result.outer_loss, **result.stats}

    def _run_group(self, batches: List[Batch]) -> Dict[str, float]:
        due = self.groups_seen % self.meta_interval == 0
        self.groups_seen += 1
        if due:
            return self._meta_step(batches)
        return {"train_loss": float(np.mean([self._real_step(b) for b in batches]))}

    # ---- public API -----------------------------------------------------------------------------------------
    def fit(self, epochs: int = 1, max_steps: Optional[int] = None) -> List[Dict[str, float]]:
        """Train for ``epochs`` epochs (or until ``max_steps`` real steps). Returns the per-epoch metrics."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        for cb in self.callbacks:
            cb.on_fit_start(self)
        start = self.epoch
        for _ in range(start, start + epochs):
            if max_steps is not None and self.global_step >= max_steps:
                break
            metrics = self._fit_epoch(max_steps)
            self.history.append(metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(self, metrics)
            self.epoch += 1
        if self.log_dir is not None:
            self.weights_history.save(self.log_dir / "weights.npz")
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def _fit_epoch(self, max_steps: Optional[int]) -> Dict[str, float]:
        bar = None
        try:
            total = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=f"epoch {self.epoch}", leave=False, dynamic_ncols=True)
        sums: Dict[str, List[float]] = {}
        pending: List[Batch] = []
        n_batches = 0
        iterator = iter(self.train_loader)
        raw = next(iterator, None)
        if raw is None:
            raise ValueError("the train loader yielded no batches")
        while raw is not None:
            nxt = next(iterator, None)
            pending.append(as_batch(raw).to(self.device))
            n_batches += 1
            if len(pending) == self.unroll_steps or nxt is None:
                metrics = self._run_group(pending)
                pending = []
                metrics.update(step=self.global_step, epoch=self.epoch)
                for k, v in metrics.items():
                    sums.setdefault(k, []).append(float(v))
                for cb in self.callbacks:
                    cb.on_step_end(self, metrics)
                if bar is not None:
                    bar.update(len(pending) or 1 if self.unroll_steps == 1 else self.unroll_steps)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("train_loss", "meta_loss")})
                if max_steps is not None and self.global_step >= max_steps:
                    break
            raw = nxt
        if bar is not None:
            bar.close()
        out = {k: float(np.nanmean(v)) for k, v in sums.items() if k not in ("step", "epoch")}
        out.update(epoch=self.epoch, step=self.global_step, meta_steps=self.meta_steps)
        out.update(self._weight_summary())
        extra = self.objective.on_epoch_end(self, self.epoch)
        if extra:
            out.update(extra)
        if self.eval_loader is not None:
            out.update({f"eval_{k}": v for k, v in self.evaluate(self.eval_loader).items()})
        return out

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
            out = self.model(batch.inputs)
            n = batch.size
            if batch.targets is not None and out.dim() == 2 and not batch.targets.dtype.is_floating_point:
                loss_sum += float(nn.functional.cross_entropy(out, batch.targets, reduction="sum"))
                correct += int((out.argmax(1) == batch.targets).sum())
            total += n
        self.model.train(was_training)
        if total == 0:
            raise ValueError("the evaluation loader yielded no samples")
        return {"loss": loss_sum / total, "accuracy": correct / total}
