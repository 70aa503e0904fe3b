"""The ``nn.Linear`` subclasses Hugging Face ``transformers`` defines per model that still compute ``z = a Wᵀ + b``
(Falcon's ``FalconLinear``, which writes the product as ``a @ W.T`` then adds the bias; a subclass that keeps
``nn.Linear``'s forward), registered by pattern so ``transformers`` is not imported.

A subclass is not ``nn.Linear`` to the registry (rules go by exact type: a subclass may compute something else, a
router or a grouped projection does), so without this rule such a layer's weights took the exact JVP path. The
closed forms are the Linear's, Gram form included. Matched by behaviour (:mod:`.behaviour`): an ``nn.Linear``
subclass under ``transformers.models`` with no other parameter, whose forward takes one input and gives, on a
stand-in with random weight (and bias) in float64 and float32, ``a @ W.T (+ b)`` (``F.linear`` where the subclass
keeps ``nn.Linear``'s forward), to a few ulps.

Example (a layer of transformers' that returns something else is not matched):
    >>> import torch
    >>> from torch import nn
    >>> from metareweight.core.layers import rule_for
    >>> class Router(nn.Linear):
    ...     def forward(self, x):
    ...         return torch.softmax(super().forward(x), -1)
    >>> Router.__module__ = "transformers.models.fake.modeling_fake"
    >>> rule_for(Router(3, 2)) is None
    True
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import register_layer_rule
from .behaviour import forward_replaced, in_package, own_parameters, random_parameter_probes, takes_one_input
from .linear import LinearRule

PATTERN = "transformers.models.*"


class HFLinearRule(LinearRule):
    """:class:`LinearRule` for a subclass of ``nn.Linear`` whose forward computes the Linear's map."""

    kind = "hf_linear"

    def describes(self, module_type):
        return in_package(module_type, "transformers.models") and issubclass(module_type, nn.Linear) \
            and takes_one_input(module_type.forward)

    def applies(self, module):
        return not forward_replaced(module) and own_parameters(module) <= {"weight", "bias"} \
            and module.weight.dim() == 2

    def probes(self, module, generator):
        return random_parameter_probes(module, generator, module.weight.shape[1])

    def expected_output(self, module, x):
        """``F.linear`` for a subclass that keeps ``nn.Linear``'s forward; else ``a @ W.T``, plus ``b`` after the
        product (a long sum is rounded differently when the bias is added inside it)."""
        if type(module).forward is nn.Linear.forward:
            return F.linear(x, module.weight, module.bias)
        out = x @ module.weight.T
        return out if module.bias is None else out + module.bias


register_layer_rule(PATTERN, HFLinearRule())
