"""``nn.RMSNorm``: ``z = x̂ ⊙ W`` with ``x̂ = x / sqrt(mean(x²) + eps)`` (no bias); element-wise like LayerNorm."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import register_layer_rule
from .layer_norm import ElementwiseAffineRule


class RMSNormRule(ElementwiseAffineRule):
    kind = "rms_norm"

    def normalise(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


register_layer_rule(nn.RMSNorm, RMSNormRule())
