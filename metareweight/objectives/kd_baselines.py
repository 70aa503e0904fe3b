"""Knowledge-distillation loss terms and the fixed-rule fusion ratios (CE only, fixed α, WLS-KD).

Every KD method here and in :mod:`metareweight.objectives.trilateral_kd` trains the student on two loss terms per
sample, combined by a per-sample fusion ratio ``α_i`` (the weight on the teacher):

    L = (1/B) Σ_i [ α_i · τ² · KL(softmax(t_i/τ) ‖ softmax(s_i/τ))  +  (1 − α_i) · CE(s_i, y_i) ]

:func:`kd_terms` computes the ``(B, 2)`` terms ``[KD, CE]`` and :func:`fusion_weights` the matching ``(B, 2)``
coefficients ``[α/B, (1−α)/B]`` (the :class:`~metareweight.core.WeightedTerms` layout), so a learned ratio
(TGeo-KD) and the fixed rules below share one loss. The rules:

- ``"ce"``: α = 0 (no teacher);
- ``"fixed"``: α constant (vanilla KD; sweep a small grid);
- ``"agree"``: α constant where the teacher's argmax agrees with the label and 0 where it does not (a hand rule
  that uses the same information the trilateral features expose; a diagnostic reference, not a paper baseline);
- ``"wls"``: WLS-KD, ``α_i = 1 − exp(−CE_s,i / CE_t,i)`` from the student's and teacher's cross-entropy on the
  label (detached; the released ``baseline_WLS.py`` rule): the teacher is trusted less where it is wrong.

Example:
    >>> import torch
    >>> s, t, y = torch.zeros(2, 3), torch.tensor([[4.0, 0, 0], [0, 0, 4.0]]), torch.tensor([0, 0])
    >>> kd_terms(s, t, y, temperature=1.0).shape
    torch.Size([2, 2])
    >>> a = wls_alpha(s, t, y)
    >>> bool(a[0] > a[1])                      # the teacher is right on sample 0 and wrong on sample 1
    True
    >>> loss = KDLoss("fixed", alpha=0.5, temperature=2.0)
    >>> round(float(loss(s, t, y)), 4) > 0
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import check_class_targets

RULES = ("ce", "fixed", "agree", "wls")


def kd_terms(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample ``[τ²·KL(teacher_τ ‖ student_τ), CE(student, y)]`` as a ``(batch, 2)`` tensor.

    The teacher side is detached (the teacher is frozen); gradients flow into the student logits only.
    """
    check_class_targets(student_logits, targets)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same (batch, classes) shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    t = teacher_logits.detach().to(student_logits.dtype)
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(t / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1) * temperature ** 2
    ce = F.cross_entropy(student_logits, targets, reduction="none")
    return torch.stack([kl, ce], 1)


def fusion_weights(alpha: Tensor) -> Tensor:
    """The ``(batch, 2)`` coefficients ``[α/B, (1−α)/B]`` that weigh :func:`kd_terms` into a mean loss."""
    if alpha.dim() != 1:
        raise ValueError(f"alpha must have shape (batch,), got {tuple(alpha.shape)}")
    return torch.stack([alpha, 1 - alpha], 1) / alpha.shape[0]


def wls_alpha(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """WLS-KD's ratio ``1 − exp(−CE_student / CE_teacher)`` per sample (detached)."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits, targets, reduction="none")
        ce_t = F.cross_entropy(teacher_logits.to(student_logits.dtype), targets, reduction="none")
        return 1 - torch.exp(-ce_s / ce_t.clamp_min(1e-8))


def rule_alpha(rule: str, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
               alpha: Optional[float] = None) -> Tensor:
    """α per sample for a fixed rule (see :data:`RULES`)."""
    n = student_logits.shape[0]
    if rule == "ce":
        return student_logits.new_zeros(n)
    if rule in ("fixed", "agree"):
        if alpha is None or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"the {rule!r} rule needs alpha in [0, 1], got {alpha!r}")
        const = student_logits.new_full((n,), float(alpha))
        return const if rule == "fixed" else const * (teacher_logits.argmax(1) == targets).to(const.dtype)
    if rule == "wls":
        return wls_alpha(student_logits, teacher_logits, targets)
    raise ValueError(f"unknown fusion rule {rule!r}; choose one of {RULES}")


class KDLoss(nn.Module):
    """The fused KD loss with a fixed rule: ``loss(student_logits, teacher_logits, targets) -> scalar``.

    Args:
        rule: ``"ce"``, ``"fixed"``, ``"agree"`` or ``"wls"``.
        alpha: the constant ratio for ``"fixed"`` (and ``"agree"``, where the teacher agrees with the label).
        temperature: the distillation temperature τ.
    """

    def __init__(self, rule: str = "fixed", alpha: Optional[float] = None, temperature: float = 1.0):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown fusion rule {rule!r}; choose one of {RULES}")
        rule_alpha(rule, torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), alpha)  # validate
        self.rule, self.alpha, self.temperature = rule, alpha, temperature

    def ratio(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        return rule_alpha(self.rule, student_logits, teacher_logits, targets, self.alpha)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        terms = kd_terms(student_logits, teacher_logits, targets, self.temperature)
        alpha = self.ratio(student_logits, teacher_logits, targets)
        return (fusion_weights(alpha) * terms).sum()
