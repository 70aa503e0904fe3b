"""TGeo-KD (Hu et al., ICLR 2024): a per-sample KD fusion ratio from trilateral geometry, learned bilevel.

The student trains on two loss terms per sample (:func:`~metareweight.objectives.kd_baselines.kd_terms`),

    L_in(θ, ω) = (1/B) Σ_i [ α_i · τ² · KL(T_i,τ ‖ S_i,τ) + (1 − α_i) · CE(S_i, y_i) ],   α_i = f_ω(features_i)

and the ratio network ``f_ω`` is the meta-parameter, trained on the clean held-out cross-entropy
``L_out = mean_j CE(S_j(θ'), y_j)`` after a lookahead step ``θ' = step(θ, ∇_θ L_in)`` by any core hypergradient
method (one-step ``"unrolled"`` by default). This is the bilevel problem the paper describes; neither released code
version solves it (one computes α under ``no_grad``, so the controller never receives a gradient; the other trains
the ratio head on the training loss itself). ``tests/test_trilateral_kd.py`` checks that ``f_ω`` moves under training and
that its hypergradient equals a float64 finite difference of the true bilevel objective.

Features (per sample; S = student softmax, T = teacher softmax, G = one-hot label, T̄ = the teacher's class-average
softmax for the sample's label), following the CIFAR code's layout: vertices S, T, T̄, G; element-wise edge lengths
|S−G|, |S−T|, |S−T̄|; and the element-wise "angles" at G, (G−T̄)⊙(G−S) and (G−T)⊙(G−S). Feature sets are switchable
(:data:`FEATURE_SETS`): ``"full"``, ``"no_tbar"`` (drops T̄ and its edge and angle) and ``"no_st"`` (drops the S–T
edge). Features are *not* detached from the student: the inner step holds the weights constant in θ anyway (see
:class:`~metareweight.core.WeightedTerms`), and multi-step unrolls stay exact.

Source of T̄ (the papers' code disagrees: a val-loader precompute vs the current batch): here it is an explicit
``(K, K)`` table passed in, and :func:`teacher_class_means` builds it once from cached teacher logits; the
experiments compute it over the student's **training split** (teacher outputs as the student sees them).

Example:
    >>> import torch
    >>> from metareweight.data import Batch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> teacher = torch.nn.Linear(4, 3)
    >>> obj = TrilateralKD(3, teacher=teacher, class_means=teacher_class_means(teacher(x), y, 3), hidden=8)
    >>> wt = obj.inner_terms(torch.nn.Linear(4, 3), Batch(x, y))
    >>> wt.terms.shape, wt.weights.shape, round(float(wt.weights.detach().sum()), 5)
    (torch.Size([6, 2]), torch.Size([6, 2]), 1.0)
    >>> len(obj.meta_parameters())             # the frozen teacher is not a meta-parameter
    4
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.problem import Forward, WeightedTerms
from ..data.batch import Batch
from ..losses import check_class_targets, cross_entropy_terms
from ..models import model_forward
from .base import MetaObjective
from .kd_baselines import fusion_weights, kd_terms

BLOCKS = ("S", "T", "Tbar", "G", "SG", "ST", "STbar", "angle_Tbar", "angle_T")
FEATURE_SETS: Dict[str, Tuple[str, ...]] = {
    "full": BLOCKS,
    "no_tbar": tuple(b for b in BLOCKS if b not in ("Tbar", "STbar", "angle_Tbar")),
    "no_st": tuple(b for b in BLOCKS if b != "ST"),
}


def resolve_feature_set(features: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """A named feature set (``"full"``, ``"no_tbar"``, ``"no_st"``) or a sequence of block names."""
    if isinstance(features, str):
        if features not in FEATURE_SETS:
            raise ValueError(f"unknown feature set {features!r}; choose one of {sorted(FEATURE_SETS)} "
                             f"or pass a list of blocks from {BLOCKS}")
        return FEATURE_SETS[features]
    blocks = tuple(features)
    bad = [b for b in blocks if b not in BLOCKS]
    if bad or not blocks:
        raise ValueError(f"feature blocks must be a non-empty subset of {BLOCKS}, got {list(blocks)}")
    return blocks


def teacher_class_means(teacher_logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """T̄: the mean teacher softmax over the samples of each label, a ``(K, K)`` table (row c = class c).

    A class with no sample gets the uniform distribution.

    Example:
        >>> teacher_class_means(torch.tensor([[9.0, 0.0], [0.0, 9.0]]), torch.tensor([0, 0]), 2)[1].tolist()
        [0.5, 0.5]
    """
    probs = F.softmax(teacher_logits.detach().double(), dim=1)
    if probs.shape[1] != num_classes:
        raise ValueError(f"teacher logits have {probs.shape[1]} classes but num_classes={num_classes}")
    sums = torch.zeros(num_classes, num_classes, dtype=probs.dtype, device=probs.device).index_add_(0, targets, probs)
    counts = torch.bincount(targets, minlength=num_classes).to(probs.dtype).unsqueeze(1)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, 1.0 / num_classes))
    return means.float()


def trilateral_features(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, class_means: Optional[Tensor],
                        blocks: Sequence[str] = BLOCKS) -> Tensor:
    """The concatenated feature blocks, ``(batch, len(blocks)·K)`` (see module docs for the blocks)."""
    k = student_logits.shape[1]
    s = F.softmax(student_logits, dim=1)
    t = F.softmax(teacher_logits.detach().to(s.dtype), dim=1)
    g = F.one_hot(targets, k).to(s.dtype)
    tbar = None
    if any(b in blocks for b in ("Tbar", "STbar", "angle_Tbar")):
        if class_means is None:
            raise ValueError("features with T̄ need class_means (teacher_class_means(...)); "
                             "or use features='no_tbar'")
        tbar = class_means.to(s)[targets]
    make = {"S": lambda: s, "T": lambda: t, "Tbar": lambda: tbar, "G": lambda: g, "SG": lambda: (s - g).abs(),
            "ST": lambda: (s - t).abs(), "STbar": lambda: (s - tbar).abs(),
            "angle_Tbar": lambda: (g - tbar) * (g - s), "angle_T": lambda: (g - t) * (g - s)}
    return torch.cat([make[b]() for b in blocks], 1)


class FusionRatioNet(nn.Module):
    """``features → hidden → 1`` MLP with a sigmoid: the per-sample ratio α ∈ (0, 1) (the CIFAR code's shape).

    ``init_alpha`` sets the output bias so that α starts near that value.
    """

    def __init__(self, in_features: int, hidden: int = 64, init_alpha: float = 0.5):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not 0.0 < init_alpha < 1.0:
            raise ValueError(f"init_alpha must be in (0, 1), got {init_alpha}")
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.body[2].bias.fill_(float(torch.logit(torch.tensor(init_alpha))))

    def forward(self, features: Tensor) -> Tensor:
        return torch.sigmoid(self.body(features).squeeze(1))


class TrilateralKD(MetaObjective):
    """The TGeo-KD objective: α·KD + (1−α)·CE with α from trilateral features, CE on clean meta data outside.

    Args:
        num_classes: K, the number of classes (the student and teacher output K logits).
        teacher: a frozen teacher module (its parameters are set to ``requires_grad=False`` and it is put in eval
            mode); optional when every batch carries cached logits under ``teacher_key``.
        class_means: the ``(K, K)`` T̄ table (:func:`teacher_class_means`); needed unless the features omit T̄.
        features: a feature-set name from :data:`FEATURE_SETS` or a list of blocks from :data:`BLOCKS`.
        hidden: width of the ratio network.
        temperature: the KD temperature τ (the KD term carries τ²).
        init_alpha: α at initialisation.
        meta_lr, meta_weight_decay: Adam on the ratio network.
        teacher_key: the batch extra that holds cached teacher logits.
    """

    def __init__(self, num_classes: int, teacher: Optional[nn.Module] = None, class_means: Optional[Tensor] = None,
                 features: Union[str, Sequence[str]] = "full", hidden: int = 64, temperature: float = 2.0,
                 init_alpha: float = 0.5, meta_lr: float = 1e-3, meta_weight_decay: float = 0.0,
                 teacher_key: str = "teacher_logits"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.num_classes = num_classes
        self.blocks = resolve_feature_set(features)
        if class_means is not None and tuple(class_means.shape) != (num_classes, num_classes):
            raise ValueError(f"class_means must be ({num_classes}, {num_classes}), got {tuple(class_means.shape)}")
        if class_means is None and any(b in self.blocks for b in ("Tbar", "STbar", "angle_Tbar")):
            raise ValueError("the feature set uses T̄ but class_means is None: pass "
                             "class_means=teacher_class_means(teacher_logits, targets, num_classes) or features='no_tbar'")
        self.register_buffer("class_means", None if class_means is None else class_means.detach().clone().float())
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.ratio_net = FusionRatioNet(len(self.blocks) * num_classes, hidden, init_alpha)
        self.temperature = temperature
        self.meta_lr = meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.teacher_key = teacher_key

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays frozen (no dropout, no BatchNorm updates)
        return self

    def teacher_logits(self, batch: Batch) -> Tensor:
        """Cached logits from ``batch.extras[teacher_key]``, else the frozen teacher's output."""
        cached = batch.extras.get(self.teacher_key)
        if cached is not None:
            return cached.detach()
        if self.teacher is None:
            raise ValueError(f"no teacher logits: the batch has no {self.teacher_key!r} field and TrilateralKD has no "
                             "teacher module; pass teacher=... or cache its outputs in the dataset "
                             f"(TensorIndexedDataset(x, y, {self.teacher_key}=...))")
        with torch.no_grad():
            return model_forward(self.teacher)(batch.inputs)

    def ratio(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        """α per sample (differentiable in ω and, through S, in the student)."""
        check_class_targets(student_logits, targets)
        if student_logits.shape[1] != self.num_classes:
            raise ValueError(f"the student outputs {student_logits.shape[1]} classes, expected {self.num_classes}")
        feats = trilateral_features(student_logits, teacher_logits, targets, self.class_means, self.blocks)
        return self.ratio_net(feats.to(self.ratio_net.body[0].weight.dtype))

    def inner_terms(self, forward: Forward, batch: Batch) -> WeightedTerms:
        student = forward(batch.inputs)
        teacher = self.teacher_logits(batch).to(student.dtype)
        terms = kd_terms(student, teacher, batch.targets, self.temperature)
        alpha = self.ratio(student, teacher, batch.targets)
        return WeightedTerms(terms, fusion_weights(alpha).to(terms.dtype), report=alpha)

    def outer_loss(self, forward: Forward, batch: Batch) -> Tensor:
        return cross_entropy_terms(forward(batch.inputs), batch.targets).mean()
