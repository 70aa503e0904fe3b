"""The RMSNorms Hugging Face ``transformers`` defines per model (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
``GemmaRMSNorm``, ``Gemma4RMSNorm``, ``T5LayerNorm``, ...): ``z = x̂ ⊙ (c + W)`` (``c`` = 0, or 1 in Gemma 1-3's
form), element-wise like LayerNorm, registered by pattern so ``transformers`` is not imported.

Each form below is matched by code (:mod:`.forms`): a class under ``transformers.models`` whose forward (and
``_norm``) compiles to the same code as the form's reference, copied from transformers 5.x. The captured ``x̂`` is
recomputed exactly as that forward computes the tensor it multiplies by the weight, in the same precision (the
Llama form normalises in float32 and casts back to the input's dtype before the product; Gemma's and OLMo-2's keep
float32 and cast the product), so mixed precision gives the weight the gradient autograd gives it. The constant
``c`` does not enter the per-sample contribution ``⟨δ_i, x̂_i ⊙ U⟩``. Any other form (a different cast, a
learned scale with a shift, ``F.rms_norm``, a replaced instance forward) keeps the exact JVP path.

Example:
    >>> from torch import nn
    >>> class LlamaRMSNorm(nn.Module):  # same name and forward, but not transformers' class
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
from typing import Callable, Dict

import torch
from torch import Tensor, nn

from .base import register_layer_rule
from .forms import forward_replaced, has_form, in_package
from .layer_norm import ElementwiseAffineRule

PATTERN = "transformers.models.*"


# ---- the forms, verbatim from transformers (compared by code; the bodies never run) --------------------------------
class _Llama(nn.Module):
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _Olmo2(nn.Module):
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class _Helium(nn.Module):
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)


class _Gemma(nn.Module):
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class _Gemma4(nn.Module):
    def _norm(self, hidden_states):
        mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon
        return hidden_states * torch.pow(mean_squared, -0.5)

    def forward(self, hidden_states):
        normed_output = self._norm(hidden_states.float())
        if self.with_scale:
            normed_output = normed_output * self.weight.float()
        return normed_output.type_as(hidden_states)


class _T5(nn.Module):
    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


# ---- the rules ------------------------------------------------------------------------------------------------------
def _rms_float32(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x²) + eps)`` in float32, as the Llama, OLMo-2 and Helium forms compute it."""
    x = x.to(torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class HFRMSNormRule(ElementwiseAffineRule):
    """The Llama form ``W ⊙ x̂.to(input dtype)`` (``x̂`` normalised in float32), epsilon ``variance_epsilon``.
    Subclasses: the other forms, each with its reference methods and its ``x̂``."""

    kind = "hf_rms_norm"
    eps_attribute = "variance_epsilon"
    reference: Dict[str, Callable] = {"forward": _Llama.forward}

    def describes(self, module_type):
        return in_package(module_type, "transformers.models") and has_form(module_type, (nn.Module,),
                                                                           **self.reference)

    def applies(self, module):
        w = getattr(module, "weight", None)
        return not forward_replaced(module) and isinstance(w, torch.Tensor) and w.dim() == 1 \
            and isinstance(getattr(module, self.eps_attribute, None), numbers.Real)

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

    def weight_grad(self, module, a, delta):
        return (delta * a).reshape(-1, module.weight.numel()).sum(0).reshape(module.weight.shape)


class HFFloat32RMSNormRule(HFRMSNormRule):
    """OLMo-2's ``(W ⊙ x̂).to(input dtype)`` and Helium's / Nemotron-H's ``(W.float() ⊙ x̂).to(input dtype)``: the
    product in float32."""

    kind = "hf_rms_norm_float32"

    def __init__(self, reference: Callable):
        self.reference = {"forward": reference}

    def normalise(self, module, x):
        return _rms_float32(x, self.eps(module))


class HFGemmaRMSNormRule(HFRMSNormRule):
    """Gemma's ``(x̂ ⊙ (1 + W.float())).type_as(x)`` (Gemma, Gemma 2 and 3, RecurrentGemma, ...), epsilon ``eps``."""

    kind = "hf_gemma_rms_norm"
    eps_attribute = "eps"
    reference = {"_norm": _Gemma._norm, "forward": _Gemma.forward}

    def normalise(self, module, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps(module))


class HFGemma4RMSNormRule(HFRMSNormRule):
    """Gemma 3n's and 4's ``(x̂ ⊙ W.float()).type_as(x)`` with ``x̂ = x·(mean(x²) + eps)^-½`` in float32 (a module
    built with ``with_scale=False`` has no weight and needs no rule)."""

    kind = "hf_gemma4_rms_norm"
    reference = {"_norm": _Gemma4._norm, "forward": _Gemma4.forward}

    def applies(self, module):
        return getattr(module, "with_scale", False) is True and super().applies(module)

    def normalise(self, module, x):
        x = x.float()
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps(module), -0.5)


class HFT5LayerNormRule(HFRMSNormRule):
    """T5's ``W ⊙ x̂`` with the mean square in float32 and ``x̂`` in the input's dtype, cast to the weight's when
    that is float16/bfloat16 (T5, mT5, LongT5, Switch Transformers, ...)."""

    kind = "hf_t5_layer_norm"
    reference = {"forward": _T5.forward}

    def normalise(self, module, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        out = x * torch.rsqrt(variance + self.eps(module))
        return out.to(module.weight.dtype) if module.weight.dtype in (torch.float16, torch.bfloat16) else out


for _rule in (HFRMSNormRule(), HFFloat32RMSNormRule(_Olmo2.forward), HFFloat32RMSNormRule(_Helium.forward),
              HFGemmaRMSNormRule(), HFGemma4RMSNormRule(), HFT5LayerNormRule()):
    register_layer_rule(PATTERN, _rule)
