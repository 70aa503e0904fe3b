"""Source-task weighting (Meta-RTL; Fu et al., arXiv 2409.19075): Reptile over several source tasks, with source
weights from an LSTM policy trained by REINFORCE on rewards measured on a low-resource target task.

Facts from the abstract: multi-source meta-transfer with Reptile; source weights from an LSTM policy trained with
REINFORCE; the reward is the difference between the general loss of the meta model and the task-specific losses of
source-specific *temporal* meta models, all on sampled target data; then target-aware fine-tuning. The paper's
method section and code were not available; everything else is a reconstruction, marked [inferred]:

One meta-iteration (:meth:`SourceTaskWeighting.meta_step`, called by ``MetaTrainer`` once per group of
``unroll_steps`` train batches):

1. θ is the user's model (the meta model). For every source ``s``, the temporal model ``θ^s`` takes ``k`` functional
   optimizer steps from θ, one per train batch of the group, on that batch's rows with ``source == s`` (``k =
   unroll_steps``). Steps use the user's optimizer rule (``FunctionalOptimizer``) from a *fresh* optimizer state,
   as Reptile restarts its inner optimizer per task [inferred]. Nothing copies the module: parameters are dicts of
   tensors run through ``torch.func.functional_call``. A source with no rows in the group keeps ``θ^s = θ`` (reward 0).
2. On the meta batch (a target batch): ``L_gen = L(θ)``, ``L_s = L(θ^s)``, reward ``R_s = L_gen - L_s`` (positive
   when adapting on ``s`` helps the target), divided by a running reward scale (``normalize_rewards``, see
   :mod:`.policy`). Small inner steps keep the reward close to its first-order value ``η ∇L_tgt·∇L_s``, which
   ranks sources by gradient alignment; with large steps the curvature term ``∝ |step|²`` dominates and any
   source that moves the model far looks bad, related or not (seen on the generated tasks).
3. The policy (:class:`~metareweight.objectives.policy.LSTMPolicy`) acts: ``mode="sample"`` draws one source
   (action reward ``R_a``); ``mode="mixture"`` draws logistic-normal mixture weights ``w`` around ``π_t`` (action reward ``Σ_s w_s R_s``,
   the first-order value of the mixed update [inferred]). One REINFORCE step with a moving-average baseline on the
   objective's meta optimizer (Adam, ``meta_lr``); then the reward vector becomes the LSTM's next input. With
   ``estimator="expected"`` the step is REINFORCE averaged exactly over the sources (every ``R_s`` is known).
4. Weighted Reptile: ``θ ← θ + β Σ_s w_s (θ^s - θ)`` with the action's weights [inferred: the action, not ``π_t``,
   so that REINFORCE evaluates the weights actually used]. ``mode="uniform"`` is the baseline: ``w_s = 1/S``, no
   policy. The user's torch optimizer state is not touched by meta steps.
5. After meta-training, :func:`fine_tune` trains θ on the target's labelled data (ordinary cross-entropy).

Sources are told apart by a per-sample integer extra (``source``, 0..S-1) on the train batches; use
:class:`SourceBalancedSampler` to draw the same number of rows from each source per batch. All sources share the
model's output: tasks with other label spaces should be cast as binary tasks or given a head of their own inside
the user's model (the experiment uses binary tasks; see ``experiments/source_tasks.py``). Groups of
``meta_interval > 1`` that are not meta steps take an ordinary step on the batch with per-sample weights
``π_t[source]/n_source`` (:meth:`SourceTaskWeighting.inner_terms`).

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from metareweight import MetaTrainer, TensorIndexedDataset
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(90, 4); src = torch.arange(90) % 3
    >>> y = torch.where(src == 2, (x[:, 1] > 0).long(), (x[:, 0] > 0).long())   # source 2 is unrelated
    >>> train = DataLoader(TensorIndexedDataset(x, y, source=src), batch_sampler=SourceBalancedSampler(src, 8))
    >>> xt = torch.randn(16, 4); target = DataLoader(TensorIndexedDataset(xt, (xt[:, 0] > 0).long()), batch_size=16)
    >>> model = torch.nn.Linear(4, 2)
    >>> obj = SourceTaskWeighting(num_sources=3, meta_lr=0.05)
    >>> trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.5), train, objective=obj,
    ...                       meta_loader=target, unroll_steps=2, progress=False)
    >>> _ = trainer.fit(epochs=3)
    >>> obj.weight_trajectory().shape
    (6, 3)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..core.problem import Forward, Params, WeightedTerms, bind
from ..data.batch import Batch, as_batch
from ..losses import cross_entropy_terms, ensure_finite
from ..models import model_forward
from .base import MetaContext, MetaObjective
from .policy import LSTMPolicy, PolicyAction, Reinforce

LossFn = Callable[[Tensor, Tensor], Tensor]
MODES = ("sample", "mixture", "uniform")


def _take(value: Any, rows: Tensor) -> Any:
    """Rows ``rows`` of a tensor, or of every tensor in a tuple/list/dict."""
    if torch.is_tensor(value):
        return value[rows]
    if isinstance(value, dict):
        return {k: _take(v, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, rows) for v in value)
    return value


def select_source(batch: Batch, source: int, key: str = "source") -> Optional[Batch]:
    """The rows of ``batch`` whose ``extras[key]`` equals ``source`` (``None`` if there are none)."""
    ids = batch.extras.get(key)
    if ids is None:
        raise ValueError(f"source-task weighting needs a per-sample {key!r} field in each train batch; build the "
                         f"dataset as TensorIndexedDataset(x, y, {key}=source_ids)")
    rows = torch.nonzero(torch.as_tensor(ids) == source).flatten()
    if rows.numel() == 0:
        return None
    return Batch(_take(batch.inputs, rows), _take(batch.targets, rows),
                 None if batch.index is None else batch.index[rows],
                 {k: _take(v, rows) for k, v in batch.extras.items()})


class SourceBalancedSampler(Sampler[List[int]]):
    """A batch sampler drawing ``per_source`` random rows of every source for each batch.

    Args:
        source_ids: the source of each dataset row (integers 0..S-1).
        per_source: rows of each source per batch.
        num_batches: batches per epoch (default: the smallest source's size // per_source, at least 1).
        generator: a ``torch.Generator`` for reproducible draws.

    Example:
        >>> s = SourceBalancedSampler(torch.tensor([0, 0, 1, 1, 1, 1]), per_source=2, num_batches=1)
        >>> sorted(int(i) >= 2 for i in next(iter(s)))
        [False, False, True, True]
    """

    def __init__(self, source_ids, per_source: int, num_batches: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        ids = torch.as_tensor(source_ids).long().flatten()
        if per_source < 1:
            raise ValueError(f"per_source must be >= 1, got {per_source}")
        if ids.numel() == 0 or int(ids.min()) < 0:
            raise ValueError("source_ids must be non-empty integers 0..S-1")
        self.rows = [torch.nonzero(ids == s).flatten() for s in range(int(ids.max()) + 1)]
        empty = [s for s, r in enumerate(self.rows) if r.numel() == 0]
        if empty:
            raise ValueError(f"source(s) {empty} have no rows; source ids must be 0..S-1 without gaps")
        self.per_source = per_source
        self.num_batches = num_batches or max(1, min(len(r) for r in self.rows) // per_source)
        self.generator = generator

    def __len__(self) -> int:
        return self.num_batches

    def draw(self) -> Tensor:
        """The row indices of one batch (a tensor)."""
        return torch.cat([r[torch.randint(len(r), (self.per_source,), generator=self.generator)] for r in self.rows])

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.num_batches):
            yield self.draw().tolist()


class SourceBatches:
    """Mixed-source batches straight from in-memory tensors, without a DataLoader's per-item collation.

    Yields dicts with ``x``, ``y``, ``index`` and ``source``; rows are drawn as by :class:`SourceBalancedSampler`
    (same arguments after the tensors).

    Example:
        >>> batches = SourceBatches(torch.randn(6, 2), torch.zeros(6).long(), torch.tensor([0, 0, 0, 1, 1, 1]), 2,
        ...                         num_batches=3)
        >>> len(batches), next(iter(batches))["source"].tolist()
        (3, [0, 0, 1, 1])
    """

    def __init__(self, x: Tensor, y: Tensor, source_ids, per_source: int, num_batches: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        self.sampler = SourceBalancedSampler(source_ids, per_source, num_batches, generator)
        if not len(x) == len(y) == sum(len(r) for r in self.sampler.rows):
            raise ValueError(f"x, y and source_ids must have the same number of rows, got {len(x)}, {len(y)} and "
                             f"{sum(len(r) for r in self.sampler.rows)}")
        self.x, self.y, self.source = x, y, torch.as_tensor(source_ids).long().flatten()

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        for _ in range(len(self.sampler)):
            idx = self.sampler.draw()
            yield {"x": self.x[idx], "y": self.y[idx], "index": idx, "source": self.source[idx]}


def check_estimator_mode(estimator: str, mode: str) -> None:
    """Refuse the expected policy gradient in ``"mixture"`` mode (it averages over discrete sources)."""
    if estimator == "expected" and mode == "mixture":
        raise ValueError("estimator='expected' averages over discrete sources; it needs mode='sample' "
                         "(mode=mixture needs estimator=sampled: mixture weights have no closed-form expectation)")


class SourceTaskWeighting(MetaObjective):
    """Meta-RTL: per-source temporal models, rewards on target batches, an LSTM policy, weighted Reptile.

    Args:
        num_sources: number of source tasks ``S``.
        mode: ``"sample"`` (discrete source sampling), ``"mixture"`` (continuous mixture weights) or
            ``"uniform"`` (equal weights, no policy: uniform-weight Reptile).
        step_size: Reptile step ``β`` in ``θ ← θ + β Σ w_s (θ^s - θ)``.
        hidden: LSTM hidden size of the policy.
        meta_lr: Adam learning rate of the policy.
        baseline_decay: decay of REINFORCE's moving-average baseline.
        entropy_coef: entropy bonus of the policy (0 disables it).
        mixture_noise: standard deviation of the logit perturbation in ``"mixture"`` mode.
        normalize_rewards: divide the rewards by a running mean of their magnitude (``LSTMPolicy.scale_rewards``).
        estimator: the policy gradient: ``"sampled"`` (REINFORCE on the drawn source's reward, the default) or
            ``"expected"`` (REINFORCE averaged exactly over the sources, ``∇ Σ_s π_s R_s``, since every source's
            reward is measured each iteration anyway; ``"sample"`` mode only). See :mod:`.policy`.
        loss_fn: per-sample loss ``(outputs, targets) -> (batch,)``; cross-entropy by default.
        source_key: the name of the per-sample source field in train batches.
    """

    uses_hypergradient = False
    meta_data = "loader"

    def __init__(self, num_sources: int, mode: str = "sample", step_size: float = 1.0, hidden: int = 32,
                 meta_lr: float = 1e-2, baseline_decay: float = 0.9, entropy_coef: float = 0.0,
                 mixture_noise: float = 0.5, normalize_rewards: bool = True, loss_fn: Optional[LossFn] = None,
                 source_key: str = "source", estimator: str = "sampled"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_estimator_mode(estimator, mode)
        if not step_size > 0:
            raise ValueError(f"step_size (the Reptile step) must be positive, got {step_size}")
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be positive, got {meta_lr}")
        self.num_sources = num_sources
        self.mode = mode
        self.step_size = step_size
        self.meta_lr = meta_lr
        self.loss_fn = loss_fn or cross_entropy_terms
        self.source_key = source_key
        self.policy = LSTMPolicy(num_sources, hidden, "sample" if mode == "uniform" else mode, mixture_noise)
        if mode == "uniform":
            self.policy.requires_grad_(False)
        self.normalize_rewards = normalize_rewards
        self.reinforce = Reinforce(baseline_decay=baseline_decay, entropy_coef=entropy_coef, estimator=estimator)
        self.trajectory: List[Dict[str, np.ndarray]] = []

    # ---- checkpoints: REINFORCE's baseline and the trajectory travel in state_dict ----------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        return {"baseline": self.reinforce.baseline, "advantage_scale": self.reinforce.scale,
                "trajectory": [{k: v.tolist() for k, v in r.items()} for r in self.trajectory]}  # plain lists

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.reinforce.baseline = state["baseline"]
        self.reinforce.scale = state["advantage_scale"]
        self.trajectory = [{k: np.asarray(v, np.float32) for k, v in r.items()} for r in state["trajectory"]]

    # ---- weights ------------------------------------------------------------------------------------------------
    def current_weights(self) -> Tensor:
        """The policy's latest probabilities ``π_t`` (uniform before the first meta step or in ``"uniform"`` mode)."""
        return self.policy.probs.detach().clone()

    def weight_trajectory(self) -> np.ndarray:
        """``(iterations, S)``: ``π_t`` of every meta-iteration so far."""
        return np.stack([r["probs"] for r in self.trajectory]) if self.trajectory else np.zeros((0, self.num_sources))

    def reward_trajectory(self) -> np.ndarray:
        """``(iterations, S)``: the reward vector ``R_t`` of every meta-iteration so far."""
        return np.stack([r["rewards"] for r in self.trajectory]) if self.trajectory else np.zeros((0, self.num_sources))

    def _source_ids(self, batch: Batch) -> Tensor:
        ids = batch.extras.get(self.source_key)
        if ids is None:
            select_source(batch, 0, self.source_key)  # raises the explanatory error
        ids = torch.as_tensor(ids).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_sources):
            raise ValueError(f"source ids must be in 0..{self.num_sources - 1} (num_sources={self.num_sources}), "
                             f"got values {int(ids.min())}..{int(ids.max())}")
        return ids

    # ---- the MetaObjective functions --------------------------------------------------------------------------
    @property
    def learns_weights(self) -> bool:  # type: ignore[override]
        return self.mode != "uniform"  # the uniform baseline's weights are 1/S by design

    def inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:
        """A plain weighted step on a mixed batch: each sample weighs ``π_t[source] / n_source``."""
        losses = self.loss_fn(forward(batch.inputs), batch.targets)
        ids = self._source_ids(batch).to(losses.device)
        probs = self.current_weights().to(losses.device, losses.dtype)
        counts = torch.bincount(ids, minlength=self.num_sources).to(losses.dtype)
        return WeightedTerms(losses, probs[ids] / counts[ids], report=probs[ids])

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:
        """The target loss (mean over the target batch)."""
        return self.loss_fn(forward(batch.inputs), batch.targets).mean()

    # ---- one meta-iteration -----------------------------------------------------------------------------------
    def temporal_params(self, context: MetaContext, params: Params, buffers: Params, batches: Sequence[Batch],
                        source: int) -> Tuple[Params, float]:
        """``θ^s``: one functional optimizer step per batch on its rows of ``source``, from a fresh optimizer
        state. Returns the detached parameters and the mean source loss of the steps (nan if none)."""
        fopt = context.functional_optimizer
        names = [n for n in fopt.param_names if n in params]
        theta = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
        state: Dict = {}
        losses = []
        for batch in batches:
            sub = select_source(batch, source, self.source_key)
            if sub is None:
                continue
            forward = bind(context.model, theta, {k: v.clone() for k, v in buffers.items()})
            loss = ensure_finite(self.loss_fn(forward(sub.inputs), sub.targets).mean(),
                                 f"the loss of source {source}")
            grads = torch.autograd.grad(loss, [theta[n] for n in names], allow_unused=True)
            theta, state = fopt.step(theta, dict(zip(names, grads)), state)
            theta = {k: v.detach().requires_grad_(k in names) for k, v in theta.items()}
            losses.append(float(loss.detach()))
        return {k: v.detach() for k, v in theta.items()}, (float(np.mean(losses)) if losses else math.nan)

    def _target_loss(self, model: nn.Module, params: Params, buffers: Params, meta_batch: Batch) -> float:
        with torch.no_grad():
            forward = bind(model, params, {k: v.clone() for k, v in buffers.items()})
            return float(ensure_finite(self.outer_loss(forward, meta_batch), "the target loss"))

    def _act(self) -> PolicyAction:
        if self.mode != "uniform":
            return self.policy.act()
        u = torch.full((self.num_sources,), 1.0 / self.num_sources, device=self.policy.probs.device)
        return PolicyAction(u, u, torch.zeros(()), torch.zeros(()))

    def meta_step(self, context: MetaContext, batches: List[Batch], meta_batch: Batch) -> Dict[str, float]:
        """One meta-iteration on a group of train batches (see the module docs); the batches' weights are recorded
        through ``context.record``."""
        model = context.model
        fopt = context.functional_optimizer
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        batches = [as_batch(b) for b in batches]
        for b in batches:
            self._source_ids(b)
        general = self._target_loss(model, params, buffers, meta_batch)
        temporal, source_losses, rewards = [], [], []
        for s in range(self.num_sources):
            theta_s, loss_s = self.temporal_params(context, params, buffers, batches, s)
            temporal.append(theta_s)
            source_losses.append(loss_s)
            rewards.append(0.0 if math.isnan(loss_s) else general - self._target_loss(model, theta_s, buffers,
                                                                                         meta_batch))
        rewards_t = torch.tensor(rewards, dtype=torch.float32)

        action = self._act()
        stats: Dict[str, float] = {}
        if self.mode != "uniform":
            scaled = self.policy.scale_rewards(rewards_t).cpu() if self.normalize_rewards else rewards_t
            reward = float(scaled[action.index] if self.mode == "sample" else (action.weights.cpu() * scaled).sum())
            stats = self.reinforce.step(action, reward, context.meta_optimizer, rewards=scaled)
            stats["reward"] = reward
            self.policy.observe(scaled)

        weights = action.weights.detach().cpu()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in fopt.hypers:
                    continue
                delta = sum(float(weights[s]) * (temporal[s][name] - params[name]) for s in range(self.num_sources))
                p.add_(self.step_size * delta.to(p.dtype))

        probs = action.probs.detach().cpu()
        for b in batches:  # the source ids travel with the batch and are recorded beside the weights
            context.record(b, probs[self._source_ids(b).cpu()])
        self.trajectory.append({"probs": probs.numpy().copy(), "weights": weights.numpy().copy(),
                                "rewards": rewards_t.numpy().copy()})
        stats.update({"meta_loss": general, "train_loss": float(np.nanmean(source_losses)),
                      "reward_mean": float(rewards_t.mean())})
        stats.update({f"weight_source{s}": float(probs[s]) for s in range(self.num_sources)})
        return stats


def fine_tune(model: nn.Module, optimizer: torch.optim.Optimizer, loader, epochs: int,
              loss_fn: Optional[LossFn] = None) -> nn.Module:
    """Target fine-tuning after meta-training: ``epochs`` of ordinary training on ``loader``. Returns ``model``.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> data = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))]
        >>> _ = fine_tune(lin, torch.optim.SGD(lin.parameters(), lr=1.0), data, epochs=50)
        >>> lin(data[0][0]).argmax(1).tolist()
        [0, 1]
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    loss_fn = loss_fn or cross_entropy_terms
    model.train()
    for _ in range(epochs):
        for raw in loader:
            b = as_batch(raw)
            loss = ensure_finite(loss_fn(model_forward(model)(b.inputs), b.targets).mean(), "the fine-tuning loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model
