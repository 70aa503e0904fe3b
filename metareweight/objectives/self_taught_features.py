"""The self-taught rescaler's per-sample features, computed from the model being trained (STORM, Heck et al. 2025).

The model runs ``G`` forward passes over a batch with dropout active. For sample ``i`` and pass ``g`` let ``ℓ_ig`` be
the cross-entropy against the (noisy) label and ``p_ig`` the *maximum* softmax probability. Then (paper Eq. 4 and
Tab. 1, in the order of the original code)::

    μℓ, gm(μℓ), gs(μℓ),  σℓ, gm(σℓ), gs(σℓ),  μp, gm(μp), gs(μp),  σp, gm(σp), gs(σp),
    KL, gm(KL), gs(KL),  OVL, gm(OVL), gs(OVL),  CAT                                       (19 features)

- ``μ``/``σ``: mean and (unbiased) std over the ``G`` passes (``σ = 0`` when ``G = 1``);
- ``CAT``: agreement, 1 when the majority vote of the passes predicts the label (a tie is broken by pass 0);
- ``gm``/``gs``: mean and (unbiased) std over the sample's *group*: the samples of the memory with the same
  label class and the same agreement category. The memory is the current batch (the paper's ``m_size = B``,
  the code's ``stats_window=1``). A group of one sample has ``gs = 1e-8``, as in the original code;
- ``KL = KL(N(μℓ, σℓ) ‖ N(gm(μℓ), gm(σℓ)))`` (0 when a std is 0) and ``OVL`` the overlap coefficient of the same
  two Gaussians (stds floored at ``1e-8``, as :meth:`statistics.NormalDist.overlap` needs).

Nothing is detached: the features are differentiable functions of the model's outputs (the agreement flag and the
group split are piecewise constant), so hypergradients through ``θ'`` see them exactly. The "loss only" ablation
uses ``[ℓ_i, CAT_i]``.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 3))
    >>> x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    >>> losses, logits = dropout_passes(model, x, y, passes=3)
    >>> storm_features(losses, logits, y).shape, len(FEATURE_NAMES)
    (torch.Size([8, 19]), 19)
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import cross_entropy_terms

EPS = 1e-8

FEATURE_NAMES = (
    "loss_mean", "loss_mean_group_mean", "loss_mean_group_std",
    "loss_std", "loss_std_group_mean", "loss_std_group_std",
    "prob_mean", "prob_mean_group_mean", "prob_mean_group_std",
    "prob_std", "prob_std_group_mean", "prob_std_group_std",
    "kl", "kl_group_mean", "kl_group_std",
    "ovl", "ovl_group_mean", "ovl_group_std",
    "agreement",
)
LOSS_ONLY_NAMES = ("loss", "agreement")
FEATURE_SETS = {"full": FEATURE_NAMES, "loss": LOSS_ONLY_NAMES}


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with a finite gradient everywhere (0 at ``x = 0``)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def pass_std(x: Tensor) -> Tensor:
    """Unbiased std over dim 0 (the passes); 0 for a single pass (the original's ``std().nan_to_num()``)."""
    if x.shape[0] < 2:
        return torch.zeros_like(x[0])
    return safe_sqrt(((x - x.mean(0)) ** 2).sum(0) / (x.shape[0] - 1))


def gaussian_kl(mu_p: Tensor, sd_p: Tensor, mu_q: Tensor, sd_q: Tensor) -> Tensor:
    """``KL(N(mu_p, sd_p) ‖ N(mu_q, sd_q))`` elementwise; 0 where a std is 0 (the original code's convention).

    Example:
        >>> float(gaussian_kl(torch.tensor(0.), torch.tensor(1.), torch.tensor(1.), torch.tensor(1.)))
        0.5
    """
    ok = (sd_p > 0) & (sd_q > 0)
    sp = torch.where(ok, sd_p, torch.ones_like(sd_p))
    sq = torch.where(ok, sd_q, torch.ones_like(sd_q))
    kl = torch.log(sq / sp) + (sp ** 2 + (mu_p - mu_q) ** 2) / (2 * sq ** 2) - 0.5
    return torch.where(ok, kl, torch.zeros_like(kl))


def _normal_cdf(x: Tensor, mu: Tensor, sd: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf((x - mu) / (sd * math.sqrt(2.0))))


def normal_overlap(mu1: Tensor, sd1: Tensor, mu2: Tensor, sd2: Tensor) -> Tensor:
    """Overlapping coefficient of two normal densities, elementwise (as :meth:`statistics.NormalDist.overlap`).

    Example:
        >>> from statistics import NormalDist
        >>> t = torch.tensor
        >>> ours = float(normal_overlap(t(0.), t(1.), t(1.), t(2.)))
        >>> abs(ours - NormalDist(0, 1).overlap(NormalDist(1, 2))) < 1e-6
        True
    """
    v1, v2 = sd1 ** 2, sd2 ** 2
    dv = v2 - v1
    dm = (mu2 - mu1).abs()
    same = dv == 0
    dv_safe = torch.where(same, torch.ones_like(dv), dv)
    equal_var = 1 - torch.erf(dm / (2 * sd1 * math.sqrt(2.0)))
    a = mu1 * v2 - mu2 * v1
    b = sd1 * sd2 * safe_sqrt(dm ** 2 + dv * torch.log(v2 / v1))
    x1, x2 = (a + b) / dv_safe, (a - b) / dv_safe
    general = 1 - ((_normal_cdf(x1, mu2, sd2) - _normal_cdf(x1, mu1, sd1)).abs()
                   + (_normal_cdf(x2, mu2, sd2) - _normal_cdf(x2, mu1, sd1)).abs())
    return torch.where(same, equal_var, general)


def agreement(logits: Tensor, targets: Tensor) -> Tensor:
    """``(batch,)`` bool: the majority of the ``G`` passes (``logits`` is ``(G, batch, classes)``) predicts the
    label; a tie is decided by pass 0 (the pass whose loss is trained)."""
    hits = logits.argmax(-1) == targets
    count = hits.sum(0)
    g = logits.shape[0]
    return torch.where(2 * count == g, hits[0], 2 * count > g)


def group_stats(x: Tensor, groups: Tensor, num_groups: int) -> Tuple[Tensor, Tensor]:
    """Per-sample mean and unbiased std of ``x`` over the samples sharing its group id (std ``1e-8`` for a group
    of one, as in the original code)."""
    onehot = F.one_hot(groups, num_groups).to(x.dtype)
    n = onehot.sum(0)
    mean = (onehot * x.unsqueeze(1)).sum(0) / n.clamp_min(1)
    sq = (onehot * (x.unsqueeze(1) - mean) ** 2).sum(0)
    std = torch.where(n > 1, safe_sqrt(sq / (n - 1).clamp_min(1)), torch.full_like(sq, EPS))
    return mean[groups], std[groups]


def dropout_passes(forward: Callable[[Tensor], Tensor], inputs, targets: Tensor, passes: int = 3,
                   input_dropout: float = 0.0,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy_terms) -> Tuple[Tensor, Tensor]:
    """Run ``passes`` forward passes; return losses ``(G, batch)`` and logits ``(G, batch, classes)``.

    Pass 0 is the one whose loss is trained. ``input_dropout > 0`` applies dropout to the inputs of passes
    ``1..G-1`` (the original code's TF-IDF setup); otherwise the model's own dropout makes the passes differ.

    Raises:
        ValueError: ``passes > 1`` but every pass gave the same output (the model has no active dropout).
    """
    if passes < 1:
        raise ValueError(f"passes (G) must be >= 1, got {passes}")
    if not 0.0 <= input_dropout < 1.0:
        raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}")
    if input_dropout and not torch.is_tensor(inputs):
        raise ValueError("input_dropout needs tensor inputs; for dict/tuple inputs put dropout inside the model")
    outs = []
    for g in range(passes):
        x = F.dropout(inputs, input_dropout, training=True) if (input_dropout and g > 0) else inputs
        outs.append(forward(x))
    logits = torch.stack(outs)
    if passes > 1 and all(torch.equal(o, outs[0]) for o in outs[1:]):
        raise ValueError(
            f"the {passes} forward passes gave identical outputs, so the dropout features (std over passes) would "
            "be constant: the model has no active dropout (or is in eval mode). Add dropout to the model, pass "
            "input_dropout=0.1 to drop inputs in the extra passes, or use passes=1.")
    losses = torch.stack([loss_fn(o, targets) for o in outs])
    return losses, logits


def storm_features(losses: Tensor, logits: Tensor, targets: Tensor, *, by_class: bool = True,
                   by_agreement: bool = True) -> Tensor:
    """The 19 features of :data:`FEATURE_NAMES`, shape ``(batch, 19)``, from :func:`dropout_passes` outputs.

    Args:
        by_class: split the group statistics by label class (off for the "w/o class separation" ablation,
            as the original code does).
        by_agreement: split them by agreement category too.
    """
    agree = agreement(logits, targets)
    probs = torch.softmax(logits, -1).amax(-1)
    mu_l, sd_l = losses.mean(0), pass_std(losses)
    mu_p, sd_p = probs.mean(0), pass_std(probs)
    groups = torch.zeros_like(targets)
    if by_class:
        groups = targets.clone()
    if by_agreement:
        groups = 2 * groups + agree.long()
    k = int(groups.max()) + 1
    feats = []
    stats = {}
    for name, v in (("mu_l", mu_l), ("sd_l", sd_l), ("mu_p", mu_p), ("sd_p", sd_p)):
        gm, gs = group_stats(v, groups, k)
        stats[name] = gm
        feats += [v, gm, gs]
    kl = gaussian_kl(mu_l, sd_l, stats["mu_l"], stats["sd_l"])
    ovl = normal_overlap(mu_l, sd_l.clamp_min(EPS), stats["mu_l"], stats["sd_l"].clamp_min(EPS))
    for v in (kl, ovl):
        feats += [v, *group_stats(v, groups, k)]
    feats.append(agree.to(losses.dtype))
    return torch.stack(feats, 1)


def loss_only_features(losses: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """The "w/o extra features" ablation: ``[ℓ_i (pass 0), CAT_i]``, shape ``(batch, 2)``."""
    return torch.stack([losses[0], agreement(logits, targets).to(losses.dtype)], 1)


def compute_features(kind: str, losses: Tensor, logits: Tensor, targets: Tensor, *, by_class: bool = True,
                     by_agreement: bool = True) -> Tensor:
    """Dispatch on the feature set name (``"full"`` or ``"loss"``)."""
    if kind == "full":
        return storm_features(losses, logits, targets, by_class=by_class, by_agreement=by_agreement)
    if kind == "loss":
        return loss_only_features(losses, logits, targets)
    raise ValueError(f"unknown feature set {kind!r}; choose one of {sorted(FEATURE_SETS)}")


def feature_dim(kind: str) -> int:
    if kind not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {kind!r}; choose one of {sorted(FEATURE_SETS)}")
    return len(FEATURE_SETS[kind])


__all__ = ["FEATURE_NAMES", "LOSS_ONLY_NAMES", "FEATURE_SETS", "dropout_passes", "storm_features",
           "loss_only_features", "compute_features", "feature_dim", "gaussian_kl", "normal_overlap", "agreement",
           "group_stats", "pass_std", "safe_sqrt"]
