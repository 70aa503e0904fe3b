"""``nn.LayerNorm``: ``z = x̂ ⊙ W + b`` with ``x̂`` the normalised input; per-sample contributions are element-wise.

The captured activation is ``x̂`` itself (recomputed once in the forward hook, without affine parameters), so
``op(x̂, U) = x̂ ⊙ U`` and ``Σ_i ∇_W ℓ_i = Σ_rows δ ⊙ x̂``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerRule, register_layer_rule


class ElementwiseAffineRule(LayerRule):
    """Shared by the normalisations with an element-wise affine over the trailing ``normalized_shape``."""

    kind = "elementwise"
    regroups = True

    def applies(self, module):
        return getattr(module, "elementwise_affine", True) and module.weight is not None

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def capture(self, module, args, output):
        if not args:
            return None
        x = args[0].detach()
        return self.normalise(module, x.to(module.weight.dtype))

    def batched(self, module, a):
        return a.dim() > len(module.normalized_shape)

    def op(self, module, a, weight):
        return a * weight

    def weight_grad(self, module, a, delta):
        return (delta * a).reshape(-1, *module.weight.shape).sum(0)

    def bias_grad(self, module, a, delta):
        return delta.reshape(-1, *module.bias.shape).sum(0)


class LayerNormRule(ElementwiseAffineRule):
    kind = "layer_norm"

    def normalise(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


register_layer_rule(nn.LayerNorm, LayerNormRule())
