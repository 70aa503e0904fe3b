"""``nn.Conv1d/2d/3d``: ``op(a, U)`` is the convolution with weight ``U``; its adjoint the weight backward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LayerRule, register_layer_rule


class ConvRule(LayerRule):
    """Per-sample ``c_i = ⟨δ_i, conv(a_i, U)⟩`` (one convolution with the weight direction ``U``)."""

    kind = "conv"

    def batched(self, module, a):
        return a.dim() == module.weight.dim()

    def op(self, module: nn.Module, a: Tensor, weight: Tensor) -> Tensor:
        return module._conv_forward(a, weight.to(a.dtype), None)

    def bias_view(self, module, u, like):
        return u.reshape(-1, *([1] * (like.dim() - 2)))

    def bias_dot(self, module, a, delta, u):
        return delta.sum(tuple(range(2, delta.dim()))) @ u.to(delta.dtype)  # spatial sums first: no transposed copy

    def weight_grad(self, module, a, delta):
        w = module.weight
        if module.padding_mode == "zeros" and not isinstance(module.padding, str) and delta.dtype == a.dtype:
            # the convolution's weight backward alone (autograd through op() would first redo the forward)
            return torch.ops.aten.convolution_backward(
                delta, a, w.detach().to(a.dtype), None, module.stride, module.padding, module.dilation, False,
                [0] * len(module.stride), module.groups, [False, True, False])[1]
        return super().weight_grad(module, a, delta)  # padding="same" or a non-zero padding mode

    def bias_grad(self, module, a, delta):
        return delta.sum((0, *range(2, delta.dim())))


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_rule(_t, ConvRule())
