"""Hugging Face's ``Conv1D`` (GPT-2, GPT, ...): a Linear whose weight is stored transposed, ``(in, out)``, and
applied as ``z = a W + b`` (``addmm``); registered by name, so ``transformers`` is not imported.

The direct form is the Linear's with the weight transposed: ``op(a, U) = a U`` and ``Σ_i ∇_W ℓ_i = aᵀ δ`` over all
rows. The Gram form is not offered (``gram = False``): the fast method's low-rank route materialises ``W'`` in the
``(out, in)`` layout when a weight is also used outside its layer.

Example (the rule is found by the class's qualified name, and only for the forward it was written for):
    >>> import torch
    >>> from torch import nn
    >>> from metareweight.core.layers import rule_for
    >>> class Conv1D(nn.Module):  # a user's layer of the same name, outside transformers
    ...     def forward(self, x):
    ...         return x
    >>> rule_for(Conv1D()) is None
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import register_layer_rule
from .forms import forward_replaced, has_form
from .linear import LinearRule

NAME = "transformers.pytorch_utils.Conv1D"


class _Reference(nn.Module):
    """The forward the rule describes (transformers 4.x-5.x): compared by code with the class's own."""

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


class HFConv1DRule(LinearRule):
    """``op(a, U) = a U`` over any leading dims; adjoint ``aᵀ δ``; bias as the Linear's."""

    kind = "hf_conv1d"
    gram = False

    def describes(self, module_type):
        return has_form(module_type, (nn.Module,), forward=_Reference.forward)

    def applies(self, module):
        w = getattr(module, "weight", None)
        return not forward_replaced(module) and torch.is_tensor(w) and w.dim() == 2 \
            and torch.is_tensor(getattr(module, "bias", None))

    def op(self, module: nn.Module, a: Tensor, weight: Tensor) -> Tensor:
        return a @ weight.to(a.dtype)

    def weight_grad(self, module, a, delta):
        in_f, out_f = self.weight(module).shape
        return a.reshape(-1, in_f).T.to(delta.dtype) @ delta.reshape(-1, out_f)


register_layer_rule(NAME, HFConv1DRule())
