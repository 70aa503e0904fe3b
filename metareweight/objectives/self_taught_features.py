"""The self-taught rescaler's per-sample features, computed from the model being trained (STORM, Heck et al. 2025).

The model runs ``G`` forward passes over a batch with dropout active. For sample ``i`` and pass ``g`` let ``ℓ_ig`` be
the cross-entropy against the (noisy) label and ``p_ig`` the *maximum* softmax probability. Then (paper Eq. 4 and
Tab. 1, in the order of the original code)::

    μℓ, gm(μℓ), gs(μℓ),  σℓ, gm(σℓ), gs(σℓ),  μp, gm(μp), gs(μp),  σp, gm(σp), gs(σp),
    KL, gm(KL), gs(KL),  OVL, gm(OVL), gs(OVL),  CAT                                       (19 features)

- ``μ``/``σ``: mean and (unbiased) std over the ``G`` passes (``σ = 0`` when ``G = 1``);
- ``CAT``: agreement, 1 when the majority vote of the passes predicts the label (a tie is broken by pass 0);
- ``gm``/``gs``: mean and (unbiased) std over the sample's *group*: the samples of the memory with the same
  label class and the same agreement category. Without a :class:`StatsMemory` the memory is the current batch.
  With one (the original code's ``Filter``) it is, per label class, the last ``stats_window · B`` samples of that
  class seen since the memory was last reset, the current batch included (``B``: the batch size), so with the
  original's default ``stats_window=1`` it spans the previous batch(es) too: about ``C`` batches' worth for
  ``C`` balanced classes. A group of one sample has ``gs = 1e-8``, as in the original code;
- ``KL = KL(N(μℓ, σℓ) ‖ N(gm(μℓ), gm(σℓ)))`` (0 when a std is 0) and ``OVL`` the overlap coefficient of the same
  two Gaussians (stds floored at ``1e-8``, as :meth:`statistics.NormalDist.overlap` needs).

Nothing of the current batch is detached: the features are differentiable functions of the model's outputs (the
agreement flag and the group split are piecewise constant), so hypergradients through ``θ'`` see them exactly; the
statistics of earlier batches held in a :class:`StatsMemory` are constants. The "loss only" ablation
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
from typing import Callable, Dict, Hashable, Optional, Tuple

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


def sample_stats(losses: Tensor, logits: Tensor, targets: Tensor) -> Dict[str, Tensor]:
    """Each sample's own statistics over the passes: ``mu_l``, ``sd_l``, ``mu_p``, ``sd_p`` (``(batch,)``), the
    agreement flag ``agree`` (bool) and its ``label``; what a :class:`StatsMemory` keeps."""
    probs = torch.softmax(logits, -1).amax(-1)
    return {"mu_l": losses.mean(0), "sd_l": pass_std(losses), "mu_p": probs.mean(0), "sd_p": pass_std(probs),
            "agree": agreement(logits, targets), "label": targets}


class StatsMemory:
    """The samples the group statistics are taken over, kept across batches (the original code's ``Filter``).

    Per label class (one pool for all samples when ``by_class=False``) it holds the :func:`sample_stats` of the
    last ``window · B`` samples of that class, ``B`` the largest batch seen; :meth:`pool` adds the current batch
    to them. Statistics of earlier batches are stored detached. Call :meth:`reset` at the end of each epoch (the
    original builds a fresh memory per epoch), and keep separate memories for training and meta batches.

    A batch is identified by ``key`` (e.g. its sample indices): a second call with the same key as the previous
    call *replaces* that batch instead of adding it again, so evaluating the same batch twice (the trainer's
    no-grad record pass, finite-difference checks) neither double-counts it nor pushes older samples out.
    The memory is not part of a checkpoint: a run resumed mid-epoch continues that epoch with an empty memory.

    Example:
        >>> mem = StatsMemory(window=1)
        >>> y = torch.tensor([0, 1, 0, 1])
        >>> stats = {"mu_l": torch.ones(4), "label": y}
        >>> pool, pos = mem.pool(stats, key="batch 1")
        >>> len(pool["mu_l"]), len(mem)
        (4, 4)
        >>> pool, pos = mem.pool({"mu_l": torch.zeros(4), "label": y}, key="batch 2")
        >>> pool["mu_l"].tolist()  # per class the last B = 4 samples: 2 from batch 1, then 2 from batch 2
        [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
        >>> pool["mu_l"][pos].tolist()  # where the current batch's samples sit in the pool
        [0.0, 0.0, 0.0, 0.0]
        >>> mem.reset(); len(mem)
        0
    """

    def __init__(self, window: int = 1):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"the statistics memory window (in batches) must be an integer >= 1, got {window!r}")
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Forget every sample (the original code starts each epoch with an empty memory)."""
        self._past: Dict[int, Dict[str, Tensor]] = {}
        self._last: Optional[Tuple[Hashable, Dict[int, Dict[str, Tensor]]]] = None
        self._batch_size = 0

    def __len__(self) -> int:
        """How many samples are remembered (at most ``window · B`` per class)."""
        counts: Dict[int, int] = {c: int(v["label"].shape[0]) for c, v in self._past.items()}
        for c, v in (self._last[1].items() if self._last else ()):
            counts[c] = counts.get(c, 0) + int(v["label"].shape[0])
        return sum(min(n, self._capacity()) for n in counts.values())

    def _capacity(self) -> int:
        return self.window * self._batch_size

    def _commit(self, chunk: Dict[int, Dict[str, Tensor]]) -> None:
        cap = self._capacity()
        for c, new in chunk.items():
            old = self._past.get(c)
            merged = new if old is None else {k: torch.cat([old[k], new[k].to(old[k])]) for k in new}
            self._past[c] = {k: v[-cap:] for k, v in merged.items()}

    def pool(self, stats: Dict[str, Tensor], key: Hashable, by_class: bool = True) -> Tuple[Dict[str, Tensor], Tensor]:
        """``(pool, positions)``: each statistic over the remembered samples of the current batch's classes plus
        the current batch, and the positions of the current batch's samples in it (in batch order). The current
        batch's values are used as given (with their gradient); it is remembered (detached) for later calls."""
        labels = stats["label"]
        n = int(labels.shape[0])
        self._batch_size = max(self._batch_size, n)
        if self._last is not None and self._last[0] != key:
            self._commit(self._last[1])
        cap = self._capacity()
        classes = labels if by_class else torch.zeros_like(labels)
        parts: Dict[str, list] = {k: [] for k in stats}
        positions = torch.empty(n, dtype=torch.long, device=labels.device)
        offset = 0
        current: Dict[int, Dict[str, Tensor]] = {}
        for c in torch.unique(classes).tolist():
            idx = (classes == c).nonzero().squeeze(1)
            old = self._past.get(c)
            keep = 0 if old is None else max(0, min(int(old["label"].shape[0]), cap - idx.numel()))
            for k, v in stats.items():
                if keep:
                    parts[k].append(old[k][old[k].shape[0] - keep:].to(v))
                parts[k].append(v[idx])
            positions[idx] = offset + keep + torch.arange(idx.numel(), device=labels.device)
            offset += keep + idx.numel()
            current[c] = {k: v[idx].detach() for k, v in stats.items()}
        self._last = (key, current)
        return {k: torch.cat(v) for k, v in parts.items()}, positions


def storm_features(losses: Tensor, logits: Tensor, targets: Tensor, *, by_class: bool = True,
                   by_agreement: bool = True, memory: Optional[StatsMemory] = None,
                   key: Hashable = None) -> Tensor:
    """The 19 features of :data:`FEATURE_NAMES`, shape ``(batch, 19)``, from :func:`dropout_passes` outputs.

    Args:
        by_class: split the group statistics by label class (off for the "w/o class separation" ablation,
            as the original code does).
        by_agreement: split them by agreement category too.
        memory: take the group statistics over this :class:`StatsMemory` plus the batch (which it then
            remembers under ``key``) instead of over the batch alone.
    """
    cur = sample_stats(losses, logits, targets)
    pick = lambda v: v  # noqa: E731  (no memory: the pool is the batch; no indexing, so gradients sum as before)
    pool = cur
    if memory is not None:
        pool, pos = memory.pool(cur, key, by_class=by_class)
        pick = lambda v: v[pos]  # noqa: E731
    groups = pool["label"].clone() if by_class else torch.zeros_like(pool["label"])
    if by_agreement:
        groups = 2 * groups + pool["agree"].long()
    k = int(groups.max()) + 1
    feats = []
    means = {}
    for name in ("mu_l", "sd_l", "mu_p", "sd_p"):
        gm, gs = group_stats(pool[name], groups, k)
        means[name] = gm
        feats += [pick(pool[name]), pick(gm), pick(gs)]
    kl = gaussian_kl(pool["mu_l"], pool["sd_l"], means["mu_l"], means["sd_l"])
    ovl = normal_overlap(pool["mu_l"], pool["sd_l"].clamp_min(EPS), means["mu_l"], means["sd_l"].clamp_min(EPS))
    for v in (kl, ovl):
        gm, gs = group_stats(v, groups, k)
        feats += [pick(v), pick(gm), pick(gs)]
    feats.append(cur["agree"].to(losses.dtype))
    return torch.stack(feats, 1)


def loss_only_features(losses: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """The "w/o extra features" ablation: ``[ℓ_i (pass 0), CAT_i]``, shape ``(batch, 2)``."""
    return torch.stack([losses[0], agreement(logits, targets).to(losses.dtype)], 1)


def compute_features(kind: str, losses: Tensor, logits: Tensor, targets: Tensor, *, by_class: bool = True,
                     by_agreement: bool = True, memory: Optional[StatsMemory] = None,
                     key: Hashable = None) -> Tensor:
    """Dispatch on the feature set name (``"full"`` or ``"loss"``; the latter has no group statistics, so it
    ignores ``memory``)."""
    if kind == "full":
        return storm_features(losses, logits, targets, by_class=by_class, by_agreement=by_agreement,
                              memory=memory, key=key)
    if kind == "loss":
        return loss_only_features(losses, logits, targets)
    raise ValueError(f"unknown feature set {kind!r}; choose one of {sorted(FEATURE_SETS)}")


def feature_dim(kind: str) -> int:
    if kind not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {kind!r}; choose one of {sorted(FEATURE_SETS)}")
    return len(FEATURE_SETS[kind])


__all__ = ["FEATURE_NAMES", "LOSS_ONLY_NAMES", "FEATURE_SETS", "dropout_passes", "storm_features", "sample_stats",
           "StatsMemory",
           "loss_only_features", "compute_features", "feature_dim", "gaussian_kl", "normal_overlap", "agreement",
           "group_stats", "pass_std", "safe_sqrt"]
