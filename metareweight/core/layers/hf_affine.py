"""The element-wise affine layers Hugging Face ``transformers`` defines per model in place of a normalisation
(MobileBERT's ``NoNorm``: ``z = x ⊙ W + b`` over the last dimension), registered by pattern so ``transformers`` is
not imported.

Without a rule every such layer of a MobileBERT (two to four per block, and the embeddings') took the exact JVP path.
The closed forms are those of a LayerNorm's affine with the input itself as ``x̂``: ``op(x, U) = x ⊙ U``,
``Σ_i ∇_W ℓ_i = Σ_rows δ ⊙ x`` and the bias summed over rows. Matched by behaviour (:mod:`.behaviour`): a class under
``transformers.models`` with exactly a 1-d ``weight`` and ``bias`` of the same size, whose forward takes one input and
gives, on a stand-in with random parameters in float64 and float32, ``x * W + b`` to a few ulps.

Example (a layer that normalises first is not this one):
    >>> import torch
    >>> from torch import nn
    >>> from metareweight.core.layers import rule_for
    >>> class NoNorm(nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
    ...     def forward(self, x):
    ...         return nn.functional.normalize(x, dim=-1) * self.weight + self.bias
    >>> NoNorm.__module__ = "transformers.models.fake.modeling_fake"
    >>> rule_for(NoNorm(4)) is None
    True
"""

from __future__ import annotations


from .base import register_layer_rule
from .behaviour import forward_replaced, in_package, own_parameters, random_parameter_probes, takes_one_input
from .layer_norm import ElementwiseAffineRule

PATTERN = "transformers.models.*"


class HFAffineRule(ElementwiseAffineRule):
    """``z = x ⊙ W + b``: the captured activation is the input itself."""

    kind = "hf_affine"

    def describes(self, module_type):
        return in_package(module_type, "transformers.models") and takes_one_input(module_type.forward)

    def applies(self, module):
        return not forward_replaced(module) and own_parameters(module) == {"weight", "bias"} \
            and module.weight.dim() == 1 and module.bias.shape == module.weight.shape

    def probes(self, module, generator):
        return random_parameter_probes(module, generator, module.weight.shape[0])

    def expected_output(self, module, x):
        return x * module.weight + module.bias

    def normalise(self, module, x):
        return x

    def batched(self, module, a):
        return a.dim() > 1


register_layer_rule(PATTERN, HFAffineRule())
