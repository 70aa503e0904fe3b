"""Self-taught on-the-fly meta loss rescaling (STORM; Heck et al., AAAI 2025).

A small rescaler network per (noisy) label class maps 19 features of each sample, computed from the model being
trained (see :mod:`~metareweight.objectives.self_taught_features`), to a weight in (0, 1)::

    Ω_c(f) = softmax(BN(L2(ReLU(BN(L1(f))))))[:, 1],   L1: d→d, L2: d→2, BatchNorm without affine parameters

    L_in(θ)      = Σ_{i∈B}     Ω_{ỹ_i}(f_i(θ)) · ℓ_i(θ)           (a sum, as the original code)
    L_out(θ', ω) = Σ_{j∈B_val} Ω_{ỹ_j}(f_j(θ')) · ℓ_j(θ')         ("meta loss rescaling": L_out depends on ω directly)

Meta batches are drawn with replacement from the *noisy training set* (``meta_data = "train"``), one meta update per
step, and the inner (virtual) step is the real step: train with
``MetaTrainer(..., objective=SelfTaughtRescaler(C), real_step="lookahead")``. The hypergradient is the sum of the
part through ``θ'`` and the direct part ``∂L_out/∂ω``; any exact method (``"unrolled"``) returns both. With
``hypergrad="fast"`` the trainer asks the method for the virtual parameters it commits (``Fast(lookahead=True)``;
pass that instance if you build the method yourself).

Presets. ``preset="library"`` (the default, also ``preset=None``) and ``preset="original"`` set five options
together; an option passed explicitly overrides its preset value (``SelfTaughtRescaler(2, preset="original",
bn_scope="class")`` is the original with per-class BatchNorm):

=========================== ====================== ============================================================
option                      ``"library"``          ``"original"`` (what ``storm.py``/``modeling.py`` do)
=========================== ====================== ============================================================
``bn_scope``                ``"class"``            ``"batch"``: every rescaler normalised over the whole batch
``stats_window``            ``0``: current batch   ``1``: per class the last ``B`` samples across batches
``init``                    ``"torch"``            ``"original"``: weights N(0, 0.02), biases 0
``detach_features``         ``False``              ``True``: features computed without gradient
``restart_inner_optimizer`` ``False``              ``True``: the inner Adam restarts at step 1 every step
=========================== ====================== ============================================================

``restart_inner_optimizer`` is carried out by the trainer, not by the objective: pass
``callbacks=objective.trainer_callbacks()`` to :class:`~metareweight.MetaTrainer` (it holds a
:class:`ResetOptimizerState` when the option is on). Each deviation of the library preset, and why:

- **Statistics memory** (``stats_window``). The original computes the group statistics (see
  :mod:`~metareweight.objectives.self_taught_features`) over a per-class memory of the last ``stats_window · B``
  samples of each label class (``B`` the batch size; default ``stats_window=1``), reset at the start of every
  epoch, with a separate memory for the meta batches. ``stats_window=1`` is therefore *not* "the current batch":
  for ``C`` balanced classes a class's memory holds about the last ``C`` batches' samples of that class, and the
  statistics of earlier batches come from older parameters. The library default (``stats_window=0``) takes them
  over the current batch only, so that every feature is a function of the current parameters (the hypergradient
  through ``θ'`` is then exact for the meta batch's group statistics too). ``stats_window=k >= 1`` gives the
  original's memory (:class:`~metareweight.objectives.self_taught_features.StatsMemory`; training batches
  (``inner_terms``) and meta batches (``outer_loss``) have separate memories, both emptied by
  :meth:`SelfTaughtRescaler.on_epoch_end`). The original's unlimited window (``--stats_window 0``) is not offered.
- **Initialisation** (``init``). The original initialises the rescalers like the rest of its Hugging Face model:
  linear weights N(0, 0.02), biases 0, about 6.6× smaller than PyTorch's default for 19 inputs. Behind the
  scale-invariant BatchNorms the same Adam learning rate then turns the rescaler far faster (a relative change
  of its weights 6.6× larger per step). The library keeps PyTorch's default, with which the paper's rescaler
  learning rate 1e-2 barely moves the rescaler in ~100 steps (``experiments/self_taught.py`` uses 0.1).
- **Detached features** (``detach_features``): see "Features are not detached" below.
- **Restarted inner optimizer** (``restart_inner_optimizer``): see "Inner optimizer state" below.
- **BatchNorm scope** (``bn_scope``): see below.

Choices that differ from, or pin down, the original code (``storm.py``/``modeling.py``):

- **BatchNorm scope.** ``bn_scope="class"`` (default; the paper's wording) runs rescaler ``c`` on the samples
  labelled ``c`` only, so its last BatchNorm centres the weights *within* the class; each class in the batch then
  needs at least 2 samples (a clear error says so; ``singleton="neutral"`` gives a lone sample the weight 0.5).
  The original code runs every class's rescaler on the *whole* batch and keeps rescaler ``c``'s output for the
  samples labelled ``c`` (``bn_scope="batch"``). That breaks the BatchNorm's guard against the degenerate
  solution: the centring constraint is shared with samples rescaler ``c`` does not weigh, so it can lower all of
  class ``c``'s weights at once (the group-statistics features identify the class). On Women's reviews with 40%
  noise this gave within-class weight AUROCs around 0.5 and below. With many classes and small batches,
  per-class BatchNorm sees only a handful of samples (about 5 per class for 6 classes and a batch of 32) and
  the rescalers then learn little either; with a batch of 128 (about 20 per class) they separate (weight AUROC
  about 0.74 on Women's reviews at 30-40% noise). At batch 32 one shared rescaler (``class_separation=False``)
  separated better (weight AUROC about 0.72 against 0.52 after 3 epochs at 40% noise on Women's reviews, meta_lr
  0.1) but cost accuracy (it can down-weight whole high-loss classes); see ``experiments/RESULTS.md``.
  At the reported size (batch 128, 15 epochs) the balance turns: on an imbalanced label set, symmetric noise makes
  some *labelled* classes mostly flips (Women's reviews at 30% noise: 9% to 94% flipped per label class), and
  per-class centring then forces their rescalers to up-weight half of those samples. There ``bn_scope="batch"``
  was far better (clean data −0.1 instead of −1.9 points, +4.9 / +11.3 over no rescaling at 30 / 40% noise, weight
  AUROC 0.89 / 0.86), while on balanced binary labels (Rotten Tomatoes) ``"class"`` was better. Prefer
  ``"batch"`` when label classes are imbalanced.
- **Inner optimizer state.** The trainer keeps the optimizer's state (Adam moments) across steps and writes the
  virtual step's state back. The original code re-creates a differentiable Adam from the stored state on every
  step without writing it back, so its inner Adam is always at step 1 (a sign-like update: about
  ``lr · sign(g)``). ``restart_inner_optimizer=True`` with ``callbacks=objective.trainer_callbacks()`` (or
  ``callbacks=[ResetOptimizerState()]`` directly) reproduces that. Compare against plain training with the same
  optimizer (``no_rescaling_restart`` in ``experiments/self_taught.py``): a restarted Adam memorises flipped labels
  less than a persistent one, so a baseline with the persistent Adam overstates the gain. The restart works with
  ``adam_preconditioner="differentiable"`` (what the original's ``higher`` Adam differentiates): ``sqrt(v)`` has
  a zero derivative at ``v = 0``, e.g. for TF-IDF words absent from a batch.
- **Features are not detached** (the original computes them without gradient; ``detach_features=True``): the
  hypergradient then is the exact derivative of the bilevel objective, including the path θ' → features → Ω on
  the meta batch.
- BatchNorm keeps no running statistics (``track_running_stats=False``): the rescaler always standardises over the
  batch it sees, which is what the original does in training, and weights do not depend on the module's mode.

Ablations of the paper's Table 2: ``meta_loss_rescaling=False`` (plain ``Σ ℓ_j(θ')`` outer loss),
``features="loss"`` (``[ℓ, CAT]`` only), ``class_separation=False`` (one shared rescaler; group statistics not
split by class), ``meta_learning=False`` (the rescaler stays at its initialisation and no hypergradient is
computed), and "meta-learning with a clean validation set" = ``meta_data="loader"`` with a clean meta loader and
``meta_loss_rescaling=False``.

Example:
    >>> import torch
    >>> from metareweight.data import Batch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> obj = SelfTaughtRescaler(num_classes=2)
    >>> model = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(5, 2))
    >>> wt = obj.inner_terms(model, Batch(torch.randn(8, 5), torch.tensor([0, 1] * 4)))
    >>> wt.terms.shape, bool(((wt.weights > 0) & (wt.weights < 1)).all())
    (torch.Size([8, 1]), True)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..callbacks import Callback
from ..core.problem import Forward, WeightedTerms
from ..data.batch import Batch
from ..losses import check_class_targets, cross_entropy_terms
from .base import META_DATA_SOURCES, MetaContext, MetaObjective
from .self_taught_features import StatsMemory, compute_features, dropout_passes, feature_dim

BN_SCOPES = ("class", "batch")
SINGLETON_POLICIES = ("error", "neutral")
INITS = ("torch", "original")
ORIGINAL_INIT_STD = 0.02  # Hugging Face's initializer_range, which modeling.py's post_init applies to the rescalers
PRESETS: Dict[str, Dict[str, Any]] = {
    "library": {"bn_scope": "class", "stats_window": 0, "init": "torch", "detach_features": False,
                "restart_inner_optimizer": False},
    "original": {"bn_scope": "batch", "stats_window": 1, "init": "original", "detach_features": True,
                 "restart_inner_optimizer": True},
}


def resolve_preset(preset: Optional[str], **explicit: Any) -> Dict[str, Any]:
    """The preset's option values, with every option passed explicitly (not ``None``) taking precedence.

    Example:
        >>> resolve_preset("original", bn_scope="class", stats_window=None, init=None, detach_features=None,
        ...                restart_inner_optimizer=None)["bn_scope"]
        'class'
    """
    name = preset or "library"
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)} (or None for 'library'), got {preset!r}")
    unknown = sorted(set(explicit) - set(PRESETS[name]))
    if unknown:
        raise ValueError(f"not preset options: {unknown}")
    return {k: (explicit[k] if explicit.get(k) is not None else v) for k, v in PRESETS[name].items()}


def batch_key(batch: Batch) -> Any:
    """What identifies a batch to the statistics memory: its sample indices, else its labels and a checksum of
    its inputs (not the tensor's address, which a later batch may reuse)."""
    if batch.index is not None:
        return ("index", tuple(batch.index.reshape(-1).tolist()))
    x = batch.inputs
    labels = tuple(batch.targets.reshape(-1).tolist())
    if torch.is_tensor(x):
        return ("content", tuple(x.shape), float(x.detach().double().sum()), labels)
    return ("object", id(x), labels)


class RescalerNet(nn.Sequential):
    """``d → d → 2`` MLP with non-affine BatchNorm after each linear layer and a softmax (one class's rescaler).

    Example:
        >>> net = RescalerNet(3)
        >>> out = net(torch.randn(6, 3))
        >>> out.shape, torch.allclose(out.sum(1), torch.ones(6))
        (torch.Size([6, 2]), True)
    """

    def __init__(self, d: int):
        if d < 1:
            raise ValueError(f"the feature dimension must be >= 1, got {d}")
        super().__init__(
            nn.Linear(d, d), nn.BatchNorm1d(d, affine=False, track_running_stats=False), nn.ReLU(),
            nn.Linear(d, 2), nn.BatchNorm1d(2, affine=False, track_running_stats=False), nn.Softmax(dim=1))


class SelfTaughtRescaler(MetaObjective):
    """The STORM meta-objective (see module docs).

    Args:
        num_classes: number of label classes (one rescaler per class unless ``class_separation=False``).
        passes: ``G``, forward passes per batch for the feature statistics (3 in the paper). ``G > 1`` needs
            dropout in the model or ``input_dropout > 0``.
        features: ``"full"`` (19 features) or ``"loss"`` (loss + agreement; the ablation).
        class_separation: one rescaler per class and class-separated group statistics (True), or one shared.
        meta_loss_rescaling: rescale the outer loss with the same rescaler (True; the paper's method).
        meta_learning: learn the rescaler (True) or keep it fixed at its initialisation (ablation).
        meta_data: ``"train"`` (meta batches from the noisy training set; the method) or ``"loader"``.
        input_dropout: dropout applied to the inputs of passes ``1..G-1`` (for models without dropout, as the
            original does for TF-IDF features).
        bn_scope: ``"class"`` (the library preset) or ``"batch"`` (the original code; see module docs).
        singleton: with ``bn_scope="class"``, a class with a single sample in a batch is an error (``"error"``)
            or gets the neutral weight 0.5 without gradient (``"neutral"``; for rare classes).
        meta_lr: Adam learning rate of the rescalers (1e-2 in the paper).
        loss_fn: per-sample loss ``(logits, targets) -> (batch,)``; cross-entropy by default.
        preset: ``"library"`` (default; also ``None``) or ``"original"``: the values of the five options below
            that are not passed explicitly (module docs: what each preset sets and why).
        stats_window: group statistics over the current batch (``0``) or over a per-class memory of the last
            ``stats_window · B`` samples of each class, reset every epoch (``>= 1``; the original's ``1``).
        init: rescaler initialisation, ``"torch"`` (PyTorch's default) or ``"original"`` (N(0, 0.02), biases 0).
        detach_features: compute the features without gradient (the original) or keep it (the library).
        restart_inner_optimizer: whether :meth:`trainer_callbacks` holds a :class:`ResetOptimizerState`.

    Example:
        >>> obj = SelfTaughtRescaler(2, preset="original", bn_scope="class")
        >>> obj.bn_scope, obj.stats_window, obj.init, obj.detach_features, obj.restart_inner_optimizer
        ('class', 1, 'original', True, True)
        >>> [type(cb).__name__ for cb in obj.trainer_callbacks()]
        ['ResetOptimizerState']
    """

    def __init__(self, num_classes: int, passes: int = 3, features: str = "full", class_separation: bool = True,
                 meta_loss_rescaling: bool = True, meta_learning: bool = True, meta_data: str = "train",
                 input_dropout: float = 0.0, bn_scope: Optional[str] = None, singleton: str = "error",
                 meta_lr: float = 1e-2, meta_weight_decay: float = 0.0,
                 loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, preset: Optional[str] = None,
                 stats_window: Optional[int] = None, init: Optional[str] = None,
                 detach_features: Optional[bool] = None, restart_inner_optimizer: Optional[bool] = None):
        super().__init__()
        chosen = resolve_preset(preset, bn_scope=bn_scope, stats_window=stats_window, init=init,
                                detach_features=detach_features, restart_inner_optimizer=restart_inner_optimizer)
        bn_scope, stats_window, init = chosen["bn_scope"], chosen["stats_window"], chosen["init"]
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes (G) must be an integer >= 1, got {passes!r}")
        if meta_data not in META_DATA_SOURCES:
            raise ValueError(f"meta_data must be one of {META_DATA_SOURCES}, got {meta_data!r}")
        if bn_scope not in BN_SCOPES:
            raise ValueError(f"bn_scope must be one of {BN_SCOPES}, got {bn_scope!r}")
        if singleton not in SINGLETON_POLICIES:
            raise ValueError(f"singleton must be one of {SINGLETON_POLICIES}, got {singleton!r}")
        if meta_lr < 0:
            raise ValueError(f"meta_lr must be >= 0, got {meta_lr}")
        if isinstance(stats_window, bool) or not isinstance(stats_window, int) or stats_window < 0:
            raise ValueError(f"stats_window must be an integer >= 0 (0: the current batch; k: the last k batches' "
                             f"worth of samples per class), got {stats_window!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.preset = preset or "library"
        self.stats_window = stats_window
        self.init = init
        self.detach_features = bool(chosen["detach_features"])
        self.restart_inner_optimizer = bool(chosen["restart_inner_optimizer"])
        # group-statistics memories of training (inner) and meta (outer) batches; emptied by on_epoch_end
        self.memories = ({"train": StatsMemory(stats_window), "meta": StatsMemory(stats_window)}
                         if stats_window else {})
        self.num_classes = num_classes
        self.passes = passes
        self.features = features
        self.d = feature_dim(features)
        self.class_separation = class_separation
        self.meta_loss_rescaling = meta_loss_rescaling
        self.meta_learning = meta_learning
        self.meta_data = meta_data
        self.input_dropout = input_dropout
        self.bn_scope = bn_scope
        self.singleton = singleton
        self.meta_lr = meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.loss_fn = loss_fn or cross_entropy_terms
        self.rescalers = nn.ModuleList(RescalerNet(self.d) for _ in range(num_classes if class_separation else 1))
        if init == "original":
            for layer in self.rescalers.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, ORIGINAL_INIT_STD)
                    nn.init.zeros_(layer.bias)
        if not meta_learning:
            self.rescalers.requires_grad_(False)

    # ---- weights --------------------------------------------------------------------------------------------
    @property
    def uses_hypergradient(self) -> bool:  # type: ignore[override]
        return self.meta_learning

    @property
    def learns_weights(self) -> bool:  # type: ignore[override]
        return self.meta_learning

    def features_of(self, forward: Forward, batch: Batch, memory: str = "train"):
        """``(features (B, d), loss terms of pass 0 (B,))`` of a batch under the bound ``forward``.

        ``memory`` names the statistics memory the batch's group statistics use and join (``"train"`` or
        ``"meta"``; only with ``stats_window >= 1``)."""
        losses, logits = dropout_passes(forward, batch.inputs, batch.targets, self.passes, self.input_dropout,
                                        self.loss_fn)
        check_class_targets(logits[0], batch.targets)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the model outputs {logits.shape[-1]} classes but the rescaler was built for "
                             f"num_classes={self.num_classes}")
        if self.memories and memory not in self.memories:
            raise ValueError(f"memory must be one of {sorted(self.memories)}, got {memory!r}")
        f_losses, f_logits = (losses.detach(), logits.detach()) if self.detach_features else (losses, logits)
        feats = compute_features(self.features, f_losses, f_logits, batch.targets, by_class=self.class_separation,
                                 memory=self.memories.get(memory), key=batch_key(batch))
        return feats, losses[0]

    def rescale(self, feats: Tensor, targets: Tensor) -> Tensor:
        """Weights in (0, 1), shape ``(batch,)``, from features ``(batch, d)`` and labels."""
        dtype = self.rescalers[0][0].weight.dtype
        feats = feats.to(dtype)
        n = feats.shape[0]
        self._check_bn(n, "the batch")
        if not self.class_separation:
            return self.rescalers[0](feats)[:, 1]
        if self.bn_scope == "batch":
            out = torch.stack([net(feats)[:, 1] for net in self.rescalers])  # (C, B)
            return out.gather(0, targets.view(1, -1)).squeeze(0)
        w = feats.new_zeros(n)
        for c in torch.unique(targets).tolist():
            idx = (targets == c).nonzero().squeeze(1)
            if idx.numel() < 2 and self.singleton == "neutral":
                w = w.index_put((idx,), torch.full_like(idx, 0.5, dtype=w.dtype))
                continue
            if idx.numel() < 2:
                raise ValueError(
                    f"class {c} has {idx.numel()} sample in this batch of {n}; its rescaler's BatchNorm "
                    "(bn_scope='class') needs at least 2 samples per class. Use a larger batch, "
                    "class_separation=False, or singleton='neutral' (weight 0.5 for a class seen once in a batch).")
            w = w.index_put((idx,), self.rescalers[c](feats[idx])[:, 1])
        return w

    @staticmethod
    def _check_bn(n: int, what: str) -> None:
        if n < 2:
            raise ValueError(f"the rescaler's BatchNorm needs at least 2 samples, but {what} has {n}. Use a larger "
                             "batch (DataLoader(drop_last=True) avoids a final batch of 1).")

    def weights(self, forward: Forward, batch: Batch, memory: str = "train"):
        feats, terms = self.features_of(forward, batch, memory)
        return self.rescale(feats, batch.targets), terms

    # ---- the two losses -------------------------------------------------------------------------------------
    def inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:
        w, terms = self.weights(forward, batch, "train")
        return WeightedTerms(terms, w.to(terms.dtype), report=w)

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:
        if not self.meta_loss_rescaling:
            return self.loss_fn(forward(batch.inputs), batch.targets).sum()
        w, terms = self.weights(forward, batch, "meta")
        return (w.to(terms.dtype) * terms).sum()

    # ---- the statistics memory and the trainer-side part of a preset ----------------------------------------
    def reset_memory(self) -> None:
        """Empty the training and meta statistics memories (no-op with ``stats_window=0``)."""
        for mem in self.memories.values():
            mem.reset()

    def on_epoch_end(self, context: MetaContext, epoch: int) -> Optional[Dict[str, float]]:
        """Empty the statistics memories: each epoch starts with none, as in the original code."""
        self.reset_memory()
        return None

    def trainer_callbacks(self) -> List[Callback]:
        """The trainer callbacks this configuration needs: ``[ResetOptimizerState()]`` with
        ``restart_inner_optimizer`` (the original preset), else ``[]``. Pass them as
        ``MetaTrainer(..., callbacks=objective.trainer_callbacks())``."""
        return [ResetOptimizerState()] if self.restart_inner_optimizer else []

    # ---- "w/o meta learning": plain weighted steps with the fixed rescaler ------------------------------------
    def meta_step(self, context: MetaContext, batches: List[Batch], meta_batch: Batch) -> Dict[str, float]:
        """With ``meta_learning=False`` this replaces the hypergradient: one ordinary weighted step per batch
        through the context's real step (gradient clipping, accumulation and weight records included)."""
        if self.meta_learning:
            raise RuntimeError("meta_step is only used with meta_learning=False")
        return {"train_loss": float(np.mean([context.real_step(b) for b in batches]))}


class ResetOptimizerState(Callback):
    """Clear the model optimizer's state after every step (the original STORM code's effective behaviour: its
    inner Adam starts from step 1 on every step).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(lin.parameters())
        >>> lin(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> class T: optimizer = opt
        >>> ResetOptimizerState().on_step_end(T, {}); len(opt.state)
        0
    """

    def on_step_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        trainer.optimizer.state.clear()


__all__ = ["SelfTaughtRescaler", "RescalerNet", "ResetOptimizerState", "BN_SCOPES", "SINGLETON_POLICIES", "PRESETS",
           "INITS", "resolve_preset"]
