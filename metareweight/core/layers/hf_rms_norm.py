"""The RMSNorms Hugging Face ``transformers`` defines per model (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
``GemmaRMSNorm``, ``Gemma4RMSNorm``, ``T5LayerNorm``, ...): ``z = x̂ ⊙ (c + W)`` (``c`` = 0, or 1 in Gemma 1-3's
form), element-wise like LayerNorm, registered by pattern so ``transformers`` is not imported: a class under
``transformers.models`` whose forward takes one input and whose only parameter is a weight vector.

The forms differ in where they cast: ``x̂`` normalised in float32 and cast back to the input's dtype before the
product (Llama), the product in float32 and then cast (OLMo-2, Helium, Gemma's ``1 + W``, Gemma 3n / 4), or ``x̂`` in
the input's dtype, cast to a half-precision weight's (T5). Each rule states its form's output
(:meth:`HFRMSNormRule.expected_output`: its ``x̂``, the constant ``c``, whether the weight is taken in float32 and
whether the product is cast back), and a class under ``transformers.models`` takes the first rule whose statement its
forward reproduces (:mod:`.behaviour`): run on a stand-in with a random weight, on inputs ``(2, 3, d)`` in float64
(float64 weight), float32 (float32 weight) and bfloat16 (float32 and bfloat16 weights), the output must have the
rule's dtype and values. The captured ``x̂`` is what the forward multiplies the weight by, in the same precision, so
mixed precision gives the weight the gradient autograd gives it; ``c`` does not enter the per-sample contribution
``⟨δ_i, x̂_i ⊙ U⟩``. Any other form (another cast, a mean subtracted, a learned shift, a replaced instance forward)
keeps the exact JVP path.

Example:
    >>> from torch import nn
    >>> class LlamaRMSNorm(nn.Module):  # same name, but outside transformers (and no normalisation)
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight, self.variance_epsilon = nn.Parameter(torch.ones(4)), 1e-6
    ...     def forward(self, hidden_states):
    ...         return hidden_states
    >>> from metareweight.core.layers import rule_for
    >>> rule_for(LlamaRMSNorm()) is None
    True
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .base import register_layer_rule
from .behaviour import forward_replaced, in_package, own_parameters, probe_tensor, stand_in, takes_one_input
from .layer_norm import ElementwiseAffineRule

PATTERN = "transformers.models.*"

#: the behavioural check's (weight, input) dtypes: the casts tell the forms apart
PROBE_DTYPES = ((torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                (torch.bfloat16, torch.bfloat16))


def _rms_float32(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dim, in float32."""
    x = x.to(torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class HFRMSNormRule(ElementwiseAffineRule):
    """The Llama form ``W ⊙ x̂.to(input dtype)`` (``x̂`` normalised in float32), epsilon ``variance_epsilon``.
    Subclasses: the other forms, each with its ``x̂`` (:meth:`normalise`) and its casts."""

    kind = "hf_rms_norm"
    eps_attribute = "variance_epsilon"
    shift = 0.0  # c in z = x̂ ⊙ (c + W)
    weight_in_float32 = False  # whether the product takes W.float()
    cast_to_input = False  # whether the product is cast to the input's dtype

    def describes(self, module_type):
        return in_package(module_type, "transformers.models") and takes_one_input(module_type.forward)

    def applies(self, module):
        w = getattr(module, "weight", None)
        return not forward_replaced(module) and own_parameters(module) == {"weight"} and w.dim() == 1 \
            and isinstance(getattr(module, self.eps_attribute, None), numbers.Real)

    def probes(self, module, generator):
        device = module.weight.device
        for w_dtype, x_dtype in PROBE_DTYPES:
            weight = probe_tensor(generator, module.weight.shape, w_dtype, device)
            x = probe_tensor(generator, (2, 3, module.weight.shape[0]), x_dtype, device)
            yield stand_in(module, weight=weight), (x,)

    def expected_output(self, module, x):
        w = module.weight.float() if self.weight_in_float32 else module.weight
        out = self.normalise(module, x) * (w + self.shift if self.shift else w)
        return out.to(x.dtype) if self.cast_to_input else out

    def eps(self, module) -> float:
        return getattr(module, self.eps_attribute)

    def capture(self, module, args, output):
        if not args or not torch.is_tensor(args[0]):
            return None
        return self.normalise(module, args[0].detach())

    def batched(self, module, a):
        return a.dim() > module.weight.dim()

    def normalise(self, module, x):
        return _rms_float32(x, self.eps(module)).to(x.dtype)


class HFFloat32RMSNormRule(HFRMSNormRule):
    """OLMo-2's ``(W ⊙ x̂).to(input dtype)`` and, with ``weight_in_float32``, Helium's / Nemotron-H's
    ``(W.float() ⊙ x̂).to(input dtype)``: the product in float32 (or the weight's wider dtype), then cast."""

    kind = "hf_rms_norm_float32"
    cast_to_input = True

    def __init__(self, weight_in_float32: bool = False):
        self.weight_in_float32 = weight_in_float32

    def normalise(self, module, x):
        return _rms_float32(x, self.eps(module))


class HFGemmaRMSNormRule(HFFloat32RMSNormRule):
    """Gemma's ``(x̂ ⊙ (1 + W.float())).to(input dtype)`` (Gemma, Gemma 2 and 3, RecurrentGemma, ...), epsilon
    ``eps``."""

    kind = "hf_gemma_rms_norm"
    eps_attribute = "eps"
    shift = 1.0

    def __init__(self):
        super().__init__(weight_in_float32=True)


class HFGemma4RMSNormRule(HFFloat32RMSNormRule):
    """Gemma 3n's and 4's ``(x̂ ⊙ W.float()).to(input dtype)`` with ``x̂ = x·(mean(x²) + eps)^-½`` in float32 (a
    module built with ``with_scale=False`` has no weight and needs no rule)."""

    kind = "hf_gemma4_rms_norm"

    def __init__(self):
        super().__init__(weight_in_float32=True)

    def applies(self, module):
        return getattr(module, "with_scale", False) is True and super().applies(module)

    def normalise(self, module, x):
        x = x.float()
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps(module), -0.5)


class HFT5LayerNormRule(HFRMSNormRule):
    """T5's ``W ⊙ x̂`` with the mean square in float32 and ``x̂`` in the input's dtype (or wider), cast to the
    weight's when that is float16/bfloat16 (T5, mT5, LongT5, Switch Transformers, ...)."""

    kind = "hf_t5_layer_norm"

    def normalise(self, module, x):
        inv_rms = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + self.eps(module))
        out = x * inv_rms
        return out.to(module.weight.dtype) if module.weight.dtype in (torch.float16, torch.bfloat16) else out


for _rule in (HFRMSNormRule(), HFFloat32RMSNormRule(), HFFloat32RMSNormRule(weight_in_float32=True),
              HFGemmaRMSNormRule(), HFGemma4RMSNormRule(), HFT5LayerNormRule()):
    register_layer_rule(PATTERN, _rule)
