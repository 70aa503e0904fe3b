"""Meta-Weight-Net (Shu et al., NeurIPS 2019): a small MLP maps each sample's loss to its weight.

Inner loss ``Σ_i ŵ_i ℓ_i`` with ``w_i = σ(MLP(ℓ_i))`` (1 → hidden → 1), normalised over the batch
(``ŵ_i = w_i / Σ_j w_j``, as in the authors' later code) or averaged (``ŵ_i = w_i / B``, the paper's first form).
The outer signal is the mean cross-entropy on a clean meta batch. The loss fed to the net is not detached: the inner step
treats weights as constants in θ, and multi-step unrolls differentiate the path φ → θ_t → ℓ_t → w_t exactly.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core.problem import Forward, WeightedTerms
from ..core.strategy import Collectives
from ..data.batch import Batch
from ..losses import cross_entropy_terms
from .base import MetaObjective

LossFn = Callable[[Tensor, Tensor], Tensor]

# How to choose the learning rates (experiments/sensitivity.py; README "Choosing the meta learning rate").
META_LR_RULE = ("Meta-Weight-Net must separate clean from noisy samples before the model memorises the noisy labels. "
                "Keep the model's learning rate moderate (SGD with momentum 0.9: lr 0.01 for a small MLP; at 0.1 it "
                "memorises within a few epochs and no meta learning rate works everywhere) and use the weight net's "
                "default Adam meta_lr=1e-3. Weights that stay together (no spread): the weight net moved too "
                "little; raise meta_lr ×3 or lower the model's lr. Weights that saturate (most near 0 or 1) or rank "
                "flipped samples above clean ones: lower meta_lr ×10 and the model's lr. On imbalanced classes with "
                "a class-balanced meta set use MetaWeightNet(meta_class_prior=\"train\").")

NO_SPREAD = 0.1    # sd / mean of the raw weights below this: not separating
SATURATED = 0.6    # share of raw weights within 0.02 of 0 or 1 above this: saturating
INVERTED = 0.4     # weight AUROC (clean vs noisy) below this: the ranking is inverted
COLLAPSED = 0.05   # mean raw weight below this (or above 1 - this): saturating
NOT_SEPARATING = 0.6  # weight AUROC below this (not inverted): the loss carries little information about the flips
IMBALANCED = 2.0   # largest / smallest class share of the labels at or above this: imbalanced
FEW_CLASSES = 3    # at most this many label classes: the hypergradient's class-level term can dominate


def weight_advice(weights, noisy=None, meta_lr: Optional[float] = None, labels=None,
                  meta_class_prior: Optional[str] = None, normalize=None) -> Optional[str]:
    """One line of advice when Meta-Weight-Net's weights look wrong, or ``None`` when they look healthy.

    Args:
        weights: each sample's latest raw weight in (0, 1), e.g. the ``"weight"`` column of the last epoch's
            rows of ``MetaTrainer.weights_history`` (``.latest(epoch=...)``).
        noisy: optional flags of the same samples (True = corrupted); enables the ranking checks.
        meta_lr: the weight net's learning rate, quoted in the advice.
        labels: optional (given) class labels of the same samples; an inverted ranking on imbalanced labels is
            blamed on the class prior (see ``MetaWeightNet(meta_class_prior="train")``).
        meta_class_prior: the objective's ``meta_class_prior`` (no class-prior advice when it is already ``"train"``).
        normalize: the objective's ``normalize``; an inverted ranking on balanced labels of few classes (at most
            :data:`FEW_CLASSES`) adds the advice ``normalize="class"`` unless it is already set.

    Checks, in order: with flags, the ranking is inverted (weight AUROC of clean vs noisy < 0.4: on imbalanced
    labels, the balanced meta set's class prior; with weights that spread, learning rates too large; with weights
    that barely spread, a loss that does not identify the flips); the weights do not spread
    (sd / mean < 0.1: the net has barely moved); with flags, the ranking barely separates (AUROC < 0.6 although the
    weights spread: the per-sample loss carries little information about the flips, as on weak features); the
    weights saturate (> 60 % within 0.02 of 0 or 1, or a mean weight below 0.05 or above 0.95: with weights
    normalised per batch their common level is free, and Adam can drift it into the sigmoid's flat ends). Healthy
    runs in the sensitivity study had sd / mean 0.5–0.8 and a saturated share near the noise rate (the flipped
    samples' weights go to 0).

    Example:
        >>> import numpy as np
        >>> weight_advice(np.r_[np.full(70, 0.45), np.full(30, 0.01)]) is None
        True
        >>> weight_advice(np.full(100, 0.5) + np.linspace(0, 0.01, 100), meta_lr=1e-4)[:53]
        "Meta-Weight-Net's weights are not separating (sd/mean"
        >>> w, flipped = np.r_[np.full(70, 0.3), np.full(30, 0.6)], np.arange(100) >= 70
        >>> advice = weight_advice(w, flipped, labels=np.r_[np.zeros(80), np.ones(20)])
        >>> advice[:68], 'meta_class_prior="train"' in advice
        ('Meta-Weight-Net ranks flipped samples above clean ones (weight AUROC', True)
    """
    import numpy as np

    from ..metrics import auroc

    w = np.asarray(weights, np.float64).ravel()
    if not w.size:
        return None
    now = f" (now {meta_lr:g})" if meta_lr else ""
    flags = None if noisy is None else np.asarray(noisy, bool).ravel()
    if flags is not None and flags.shape != w.shape:
        raise ValueError(f"noisy has {flags.size} flags for {w.size} weights")
    auc = auroc(w, ~flags) if flags is not None and flags.any() and (~flags).any() else None
    spread = float(w.std() / max(w.mean(), 1e-12))
    if auc is not None and auc < INVERTED:
        shares = _class_shares(labels, w.size)
        imbalanced = _imbalance(shares)
        prior = imbalanced if meta_class_prior is None else None
        few_balanced = shares is not None and not imbalanced and 2 <= shares.size <= FEW_CLASSES
        per_class = "" if normalize == "class" or not few_balanced else (
            " With few classes the one-step hypergradient of a weight is dominated by a class-level term (more of "
            "whichever class the model under-predicts now) that a loss -> weight net turns into up-weighting "
            "high-loss samples: try MetaWeightNet(normalize=\"class\") (weights normalised within each class).")
        if prior:
            return (f"Meta-Weight-Net ranks flipped samples above clean ones (weight AUROC {auc:.2f}) and the "
                    f"labels are imbalanced ({prior}): against a class-balanced meta set the weight net learns to "
                    "up-weight high-loss (minority-labelled, often flipped) samples. Use "
                    "MetaWeightNet(meta_class_prior=\"train\"), or draw the meta set with the training classes' "
                    "proportions.")
        if spread < NO_SPREAD:
            return (f"Meta-Weight-Net ranks flipped samples above clean ones (weight AUROC {auc:.2f}) while its "
                    f"weights barely spread (sd/mean {spread:.2f}): the loss does not identify the flipped labels on "
                    "this data, and raising meta_lr would amplify the wrong ranking. Compare with training on the "
                    "clean meta set alone, and look for better features or a model that fits the clean labels "
                    "first." + per_class)
        return (f"Meta-Weight-Net ranks flipped samples above clean ones (weight AUROC {auc:.2f}): lower "
                f"meta_lr ×10{now} and the model's learning rate (SGD 0.01 for a small MLP)." + per_class)
    if spread < NO_SPREAD:
        chance = "" if auc is None or auc >= NOT_SEPARATING else (
            f" Their ranking of the flipped samples is near chance (weight AUROC {auc:.2f}): if a larger meta_lr "
            "does not help, the loss carries no information about the flips on this data (weak features; check that "
            "plain training beats the majority class) and reweighting cannot help: compare with training on the "
            "clean meta set alone.")
        return (f"Meta-Weight-Net's weights are not separating (sd/mean {spread:.2f} < {NO_SPREAD}): the weight net "
                f"has barely moved; raise meta_lr ×3{now} (default 1e-3), lower the model's learning rate, or train "
                "longer." + chance)
    if auc is not None and auc < NOT_SEPARATING:
        return (f"Meta-Weight-Net's weights barely tell flipped from clean samples (weight AUROC {auc:.2f}) although "
                "they spread: the per-sample loss carries little information about which labels are wrong on this "
                "data (typical of weak features, where plain training barely beats the majority class). "
                "Reweighting by loss cannot fix that: compare with training on the clean meta set alone, and look "
                "for better features or a model that fits the clean labels first.")
    saturated = float(((w < 0.02) | (w > 0.98)).mean())
    if saturated > SATURATED or not COLLAPSED < w.mean() < 1 - COLLAPSED:
        return (f"Meta-Weight-Net's weights are saturating ({saturated:.0%} within 0.02 of 0 or 1, mean "
                f"{w.mean():.3f}): lower meta_lr ×10{now} and the model's learning rate (SGD 0.01 for a small MLP).")
    return None


COLLAPSED_WEIGHT = 1e-6  # a batch's mean raw weight below this: the weights collapsed, weight it uniformly


def normalized(w: Tensor, collectives: Collectives) -> Tensor:
    """``w / Σ w`` over the global batch (in a distributed run the mean over ranks of the local sums and sizes), or
    uniform weights ``1 / batch size`` when the batch's mean raw weight is below :data:`COLLAPSED_WEIGHT` (all
    sigmoids near 0: dividing by a sum near 0 would blow the weights or their gradient up, and an exact 0 would
    stop training).

    Example:
        >>> normalized(torch.tensor([1.0, 3.0]), Collectives()).tolist()
        [0.25, 0.75]
        >>> normalized(torch.zeros(4), Collectives()).tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    total, size = collectives.differentiable_mean([w.sum(), w.new_tensor(float(w.shape[0]))])
    floor = COLLAPSED_WEIGHT * size.detach()
    return torch.where(total > floor, w / total.clamp_min(floor), size.detach().reciprocal())


def normalized_per_class(w: Tensor, labels: Tensor, collectives: Collectives) -> Tensor:
    """Weights normalised within each class of the (global) batch, each class keeping its share of the batch:
    ``ŵ_i = (n_c / B) · w_i / Σ_{j: y_j = c} w_j`` for sample ``i`` of class ``c``. Reweighting then only ranks
    samples against others of their class and cannot move the batch's class balance. A class whose weights collapse
    (mean raw weight below :data:`COLLAPSED_WEIGHT`) is weighted uniformly (``1 / B`` each).

    Example:
        >>> normalized_per_class(torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1]), Collectives()).tolist()
        [0.125, 0.375, 0.25, 0.25]
    """
    if not _class_labels(labels) or labels.shape != w.shape:
        raise ValueError(f"MetaWeightNet(normalize='class') needs one integer class label per sample (got targets of "
                         f"{_shape_and_dtype(labels)} for {w.shape[0]} weights); use normalize=True for other targets")
    y = labels.long()
    local_classes = int(y.max()) + 1 if y.numel() else 0
    classes = -int(collectives.agree_min(-torch.tensor(local_classes, device=w.device)))
    onehot = torch.nn.functional.one_hot(y, classes).to(w.dtype)
    sums, counts, size = collectives.differentiable_mean([onehot.T @ w, onehot.sum(0), w.new_tensor(float(w.shape[0]))])
    healthy = sums > COLLAPSED_WEIGHT * counts.detach()
    scale = counts.detach() / size.detach() / torch.where(healthy, sums, torch.ones_like(sums))
    return torch.where(healthy[y], w * scale[y], size.detach().reciprocal())


def _class_shares(labels, n: int):
    """The shares of the classes present among ``n`` integer class labels, or None (no labels, or not ``n``
    non-negative integers)."""
    import numpy as np

    if labels is None:
        return None
    y = np.asarray(labels).ravel()
    if y.size != n or not y.size or not np.all(np.isfinite(y)) or np.any(y != np.round(y)) or y.min() < 0:
        return None
    share = np.bincount(y.astype(np.int64)) / y.size
    return share[share > 0]


def _imbalance(shares) -> Optional[str]:
    """'largest class 55 %, smallest 6 %' when the class shares are imbalanced (ratio ≥ IMBALANCED), else None."""
    if shares is None or shares.size < 2 or shares.max() < IMBALANCED * shares.min():
        return None
    return f"largest class {shares.max():.0%}, smallest {shares.min():.0%} of the labels"


class MetaWeightNet(MetaObjective):
    """Loss → weight MLP with a clean meta set.

    Args:
        hidden: width of the hidden layer (100 in the paper).
        normalize: normalise weights to sum to one over the batch (True; uniform when they collapse to ~0, see
            :func:`normalized`), divide by the batch size (False), or ``"class"``: normalise within each class of
            the batch, each class keeping its share (:func:`normalized_per_class`; integer class targets). Use
            ``"class"`` against label noise on balanced classes, above all with few classes: there the one-step
            hypergradient of a sample's weight is dominated by a class-level term (the meta batch asks for more of
            whichever class the model under-predicts right now, and that flips between steps), which a loss → weight
            net turns into up-weighting high-loss samples; per-class normalisation removes that term and keeps the
            within-class ranking (fine-tuning MiniLM on 40 %-flipped Rotten Tomatoes: the hypergradient's AUROC of
            clean vs flipped 0.55 → 0.70, experiments/RESULTS.md). Not for class imbalance, where moving the class
            balance is the point.
        meta_lr: Adam learning rate of the weight net (1e-3 in the paper, with weight decay 1e-4). With the model
            trained by SGD at a moderate learning rate (0.01 for a small MLP) it worked on every small noisy set of
            the sensitivity study; see :data:`META_LR_RULE` and :func:`weight_advice` when the weights do not
            separate or saturate.
        meta_weight_decay: weight decay of the weight net.
        loss_fn: per-sample loss ``(outputs, targets) -> (batch,)``; cross-entropy by default.
        classes: ``None`` (the paper): the net sees the loss only. An integer ``C``: the net also sees the sample's
            given label, one-hot (a class-aware weight function, as CMW-Net's class-level input; integer targets in
            ``[0, C)``), so it can learn weights per class as well as per loss. Use it on imbalanced classes: a
            loss-only net can shift weight to a minority class only through the loss, which also up-weights the
            hard samples of every other class (fine-tuning MiniLM on Rotten Tomatoes with 10 % rotten snippets:
            raw weights rotten 0.18 vs fresh 0.02 and the test predictions did not move, experiments/RESULTS.md).
            Against label noise on balanced classes keep ``None`` with ``normalize="class"``.
        meta_class_prior: ``None`` (the paper): the outer loss is the meta batch's mean loss. ``"train"``: each
            class of the meta batch counts in proportion to its share of the training labels seen so far (counted
            over the inner batches; rank-local in a distributed run), so a class-balanced meta set stands for
            imbalanced training (and test) data. Without it, on imbalanced classes the balanced meta set rewards
            up-weighting high-loss samples — the minority-labelled ones, many of them flipped — and the weights
            can rank flipped samples above clean ones (Women's reviews in the sensitivity study: weight AUROC
            0.25 → 0.77). With balanced classes it changes almost nothing. Needs integer class targets; other
            targets fall back to the mean.

    Example:
        >>> import torch
        >>> from metareweight.data import Batch
        >>> obj = MetaWeightNet(hidden=8)
        >>> model = torch.nn.Linear(3, 2)
        >>> wt = obj.inner_terms(model, Batch(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> wt.terms.shape, round(float(wt.weights.detach().sum()), 5)
        (torch.Size([4, 1]), 1.0)
    """

    def __init__(self, hidden: int = 100, normalize: bool = True, meta_lr: float = 1e-3,
                 meta_weight_decay: float = 1e-4, loss_fn: Optional[LossFn] = None,
                 meta_class_prior: Optional[str] = None, classes: Optional[int] = None):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 2):
            raise ValueError(f"classes must be None or the number of classes (an int >= 2), got {classes!r}")
        self.classes = classes
        if normalize not in (True, False, "class"):
            raise ValueError(f"normalize must be True, False or 'class', got {normalize!r}")
        if meta_class_prior not in (None, "train"):
            raise ValueError(f"meta_class_prior must be None or 'train', got {meta_class_prior!r}")
        self.meta_class_prior = meta_class_prior
        if meta_class_prior == "train":  # training-label counts per class, grown as classes appear; saved with the
            self.register_buffer("train_class_counts", torch.zeros(0))  # objective, for exact resumes
        self.net = nn.Sequential(nn.Linear(1 + (classes or 0), hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())
        self.normalize = normalize
        self.meta_lr = meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.loss_fn = loss_fn or cross_entropy_terms

    def weight(self, losses: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Raw weights in (0, 1) for per-sample losses of shape ``(batch,)`` (and, for a class-aware net, the
        samples' integer labels)."""
        net_dtype = self.net[0].weight.dtype
        x = losses.to(net_dtype).unsqueeze(1)
        if self.classes is not None:
            if labels is None or not _class_labels(labels) or labels.shape != losses.shape \
                    or (labels.numel() and int(labels.max()) >= self.classes):
                raise ValueError(f"MetaWeightNet(classes={self.classes}) weighs each sample by its loss and its label: "
                                 f"it needs one integer label in [0, {self.classes}) per loss (got "
                                 f"{_shape_and_dtype(labels)} for {losses.shape[0]} losses); set classes to the "
                                 "number of classes, or classes=None for a loss-only net")
            x = torch.cat([x, nn.functional.one_hot(labels.long(), self.classes).to(net_dtype)], 1)
        return self.net(x).squeeze(1)

    def inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:
        self._count_train_classes(batch.targets)
        losses = self.loss_fn(forward(batch.inputs), batch.targets)
        w = self.weight(losses) if self.classes is None else self.weight(losses, batch.targets)
        if self.normalize == "class":
            coef = normalized_per_class(w, batch.targets, self.collectives)
        elif self.normalize:
            coef = normalized(w, self.collectives)
        else:
            coef = w / w.shape[0]
        return WeightedTerms(losses, coef.to(losses.dtype), report=w)

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:
        losses = self.loss_fn(forward(batch.inputs), batch.targets)
        if self.meta_class_prior is None:
            return losses.mean()
        counts, y = self.train_class_counts, batch.targets
        if not _class_labels(y) or losses.shape != y.shape or not y.numel() or float(counts.sum()) <= 0:
            return losses.mean()
        # Σ_c π_c · (mean loss of class c in the batch), normalised over the classes present; a class never seen
        # among the training labels has π_c = 0
        y = y.long()
        in_batch = torch.bincount(y, minlength=counts.numel()).to(losses.dtype)
        prior = torch.zeros(in_batch.numel(), dtype=losses.dtype, device=losses.device)
        prior[: counts.numel()] = counts.to(prior) / counts.sum().to(prior)
        per_sample = prior[y] / in_batch[y]
        if float(per_sample.sum()) <= 0:  # only classes never seen in training: nothing to weight by
            return losses.mean()
        return (per_sample * losses).sum() / per_sample.sum()

    @torch.no_grad()
    def _count_train_classes(self, targets: Tensor) -> None:
        if self.meta_class_prior is None or not _class_labels(targets) or not targets.numel():
            return
        counts = torch.bincount(targets.long().detach().cpu(), minlength=self.train_class_counts.numel())
        if counts.numel() > self.train_class_counts.numel():
            grown = self.train_class_counts.new_zeros(counts.numel())
            grown[: self.train_class_counts.numel()] = self.train_class_counts
            self.train_class_counts = grown
        self.train_class_counts += counts.to(self.train_class_counts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "train_class_counts"
        if self.meta_class_prior is None:
            pass
        elif key in state_dict:  # the saved counts may cover more classes than seen so far
            self.train_class_counts = torch.zeros_like(state_dict[key])
        else:  # a checkpoint from before the counts existed
            state_dict[key] = self.train_class_counts.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _shape_and_dtype(targets) -> str:
    """``"shape (4,) and dtype torch.float32"`` of targets that may not be a tensor (for error messages)."""
    return f"shape {tuple(getattr(targets, 'shape', ()))} and dtype {getattr(targets, 'dtype', type(targets))}"


def _class_labels(targets) -> bool:
    return isinstance(targets, Tensor) and targets.dim() == 1 and not targets.dtype.is_floating_point \
        and not targets.dtype.is_complex and targets.dtype != torch.bool and (not targets.numel() or
                                                                             int(targets.min()) >= 0)
