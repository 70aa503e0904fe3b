"""``nn.Linear`` over any leading dims (batch, tokens, ...): ``z = a Wᵀ + b``; direct and Gram forms."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerRule, register_layer_rule


class LinearRule(LayerRule):
    """``op(a, U) = a Uᵀ``; adjoint ``δᵀ a`` over all rows; the Gram form over rows (tokens count as rows)."""

    kind = "linear"
    gram = True
    regroups = True

    def op(self, module: nn.Module, a: Tensor, weight: Tensor) -> Tensor:
        return F.linear(a, weight)

    def bias_dot(self, module, a, delta, u):
        return (delta @ u).reshape(a.shape[0], -1).sum(1)

    def weight_grad(self, module, a, delta):
        out_f, in_f = self.weight(module).shape
        return delta.reshape(-1, out_f).T @ a.reshape(-1, in_f)

    def bias_grad(self, module, a, delta):
        return delta.reshape(-1, delta.shape[-1]).sum(0)


register_layer_rule(nn.Linear, LinearRule())
