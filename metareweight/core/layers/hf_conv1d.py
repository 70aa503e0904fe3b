"""Hugging Face's ``Conv1D`` (GPT-2, GPT, ...): a Linear whose weight is stored transposed, ``(in, out)``, and
applied as ``z = a W + b`` (``addmm``); registered by name, so ``transformers`` is not imported.

The direct form is the Linear's with the weight transposed: ``op(a, U) = a U`` and ``Σ_i ∇_W ℓ_i = aᵀ δ`` over all
rows. The Gram form is not offered (``gram = False``): the fast method's low-rank route materialises ``W'`` in the
``(out, in)`` layout when a weight is also used outside its layer.

Matched by behaviour (:mod:`.behaviour`): the class's forward, run on a stand-in with random ``(in, out)`` weight and
bias on inputs ``(2, 3, in)`` in float64 and float32, must give ``a W + b``, to a few ulps.

Example (the rule is found by the class's qualified name, and only for a class that computes ``a W + b``):
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
from .behaviour import forward_replaced, own_parameters, random_parameter_probes, takes_one_input
from .linear import LinearRule

NAME = "transformers.pytorch_utils.Conv1D"


class HFConv1DRule(LinearRule):
    """``op(a, U) = a U`` over any leading dims; adjoint ``aᵀ δ``; bias as the Linear's."""

    kind = "hf_conv1d"
    gram = False

    def describes(self, module_type):
        return takes_one_input(module_type.forward)

    def applies(self, module):
        return not forward_replaced(module) and own_parameters(module) == {"weight", "bias"} \
            and module.weight.dim() == 2 and module.bias.dim() == 1

    def probes(self, module, generator):
        return random_parameter_probes(module, generator, module.weight.shape[0])

    def expected_output(self, module, x):
        """``b + a W`` over the rows of ``a``, the bias added inside the product (``addmm``: a sum of more than a few
        hundred terms is rounded differently when the bias is added after it)."""
        rows = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), module.weight)
        return rows.reshape(*x.shape[:-1], rows.shape[-1])

    def op(self, module: nn.Module, a: Tensor, weight: Tensor) -> Tensor:
        return a @ weight.to(a.dtype)

    def weight_grad(self, module, a, delta):
        in_f, out_f = self.weight(module).shape
        return a.reshape(-1, in_f).T.to(delta.dtype) @ delta.reshape(-1, out_f)


register_layer_rule(NAME, HFConv1DRule())
