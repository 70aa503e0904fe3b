"""The simple fixes a user tries before meta-learning weights: class weights, oversampling, focal loss,
logit adjustment and small-loss sample selection.

Every loss here is *per sample* (shape ``(batch,)``) so it can be averaged, weighted or masked like
:func:`~metareweight.losses.cross_entropy_terms`. None of them learns anything: they are the baselines that
meta-learned weighting has to beat (see ``experiments/classic.py``).

Example:
    >>> import torch
    >>> labels = torch.tensor([0, 0, 0, 1])
    >>> class_weights(labels, 2)               # inverse frequency, mean weight over samples = 1
    tensor([0.6667, 2.0000])
    >>> logits = torch.zeros(4, 2)
    >>> focal_loss(logits, labels, gamma=0.0)  # gamma = 0 is cross-entropy
    tensor([0.6931, 0.6931, 0.6931, 0.6931])
    >>> small_loss_mask(torch.tensor([0.1, 2.0, 0.3, 5.0]), keep_ratio=0.5)
    tensor([ True, False,  True, False])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import WeightedRandomSampler

__all__ = ["class_counts", "class_weights", "balanced_sampler", "focal_loss", "logit_adjusted_loss",
           "small_loss_mask", "keep_ratio_schedule"]


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Samples per class, shape ``(num_classes,)``; labels must be integers in ``0..num_classes-1``."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-d integer tensor, got dtype {labels.dtype}, shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got range "
                         f"{int(labels.min())}..{int(labels.max())}")
    return torch.bincount(labels, minlength=num_classes)


def class_weights(labels: Tensor, num_classes: int, power: float = 1.0) -> Tensor:
    """Per-class weights ``∝ n_c^(-power)`` (1: inverse frequency, 0.5: inverse square root).

    Scaled so the mean weight over the *samples* is 1, which keeps the loss scale (and so the learning rate)
    of unweighted training. Classes absent from ``labels`` get weight 0.
    """
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    counts = class_counts(labels, num_classes).double()
    w = torch.where(counts > 0, counts.clamp_min(1).pow(-power), torch.zeros_like(counts))
    w = w * counts.sum() / (w * counts).sum()
    return w.float()


def balanced_sampler(labels: Tensor, num_classes: int, num_samples: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> WeightedRandomSampler:
    """Random oversampling: draw samples with replacement so that every present class is equally likely.

    ``num_samples`` (default ``len(labels)``) keeps an epoch as long as an ordinary one, so oversampling costs
    no more steps than plain training.

    Example:
        >>> s = balanced_sampler(torch.tensor([0] * 90 + [1] * 10), 2, num_samples=1000,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> drawn = torch.tensor(list(s))
        >>> 0.4 < float((drawn >= 90).float().mean()) < 0.6
        True
    """
    labels = torch.as_tensor(labels)
    counts = class_counts(labels, num_classes).double()
    per_sample = 1.0 / counts[labels]
    return WeightedRandomSampler(per_sample, num_samples or len(labels), replacement=True, generator=generator)


def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: Optional[Tensor] = None) -> Tensor:
    """Focal loss (Lin et al., 2017) per sample: ``-α_y (1 - p_y)^γ log p_y``; γ = 0 and no α is cross-entropy.

    ``alpha`` is an optional per-class weight vector (e.g. :func:`class_weights`).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    log_p = F.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - log_p.exp()).clamp_min(0.0) ** gamma) * log_p
    return loss if alpha is None else loss * alpha.to(loss)[targets]


def logit_adjusted_loss(logits: Tensor, targets: Tensor, class_prior: Tensor, tau: float = 1.0) -> Tensor:
    """Logit-adjusted cross-entropy (Menon et al., ICLR 2021) per sample: ``CE(logits + τ log π, y)``.

    Train with this loss and predict with the *unadjusted* ``logits.argmax(1)``: the offset makes the model's
    scores balanced-error optimal. ``class_prior`` is the training label distribution π (sums to one).

    Example:
        >>> prior = torch.tensor([0.9, 0.1])
        >>> l = logit_adjusted_loss(torch.zeros(2, 2), torch.tensor([0, 1]), prior)
        >>> bool(l[1] > l[0])   # the rare class is pushed to a larger margin
        True
    """
    prior = torch.as_tensor(class_prior, dtype=logits.dtype, device=logits.device)
    if prior.shape != logits.shape[1:]:
        raise ValueError(f"class_prior has shape {tuple(prior.shape)}, expected ({logits.shape[1]},)")
    if (prior < 0).any() or abs(float(prior.sum()) - 1.0) > 1e-4:
        raise ValueError("class_prior must be a probability vector (non-negative, summing to one)")
    return F.cross_entropy(logits + tau * prior.clamp_min(1e-12).log(), targets, reduction="none")


def small_loss_mask(losses: Tensor, keep_ratio: float) -> Tensor:
    """Boolean mask keeping the ``ceil(keep_ratio · B)`` smallest losses of a batch (at least one sample).

    This is the sample selection of co-teaching (Han et al., 2018) with a single network: samples with large loss
    are treated as probably mislabelled and left out of the step.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    n = losses.shape[0]
    k = max(1, min(n, int(torch.ceil(torch.tensor(keep_ratio * n)).item())))
    mask = torch.zeros(n, dtype=torch.bool, device=losses.device)
    mask[torch.argsort(losses.detach())[:k]] = True
    return mask


def keep_ratio_schedule(epoch: int, forget_rate: float, warmup_epochs: int = 10) -> float:
    """Co-teaching's schedule: keep everything at first, then drop linearly more until ``forget_rate`` is dropped.

    ``keep = 1 - forget_rate · min(1, epoch / warmup_epochs)``. The forget rate is usually set to the (estimated)
    noise rate.

    Example:
        >>> [round(keep_ratio_schedule(e, 0.4, warmup_epochs=4), 2) for e in range(6)]
        [1.0, 0.9, 0.8, 0.7, 0.6, 0.6]
    """
    if not 0.0 <= forget_rate < 1.0:
        raise ValueError(f"forget_rate must be in [0, 1), got {forget_rate}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    ramp = 1.0 if warmup_epochs == 0 else min(1.0, epoch / warmup_epochs)
    return 1.0 - forget_rate * ramp
