"""The scaled word embeddings Hugging Face ``transformers`` defines per model (``GemmaTextScaledWordEmbedding``,
``BartScaledWordEmbedding``, ...): an ``nn.Embedding`` whose output is multiplied by a constant ``s``
(``embed_scale``: √hidden in Gemma), registered by pattern so ``transformers`` is not imported.

``z = s W[a]``: the lookup's per-sample contribution is ``s ⟨δ_i, U[a_i]⟩`` and each lookup adds ``s δ`` to its row's
gradient. Matched by behaviour (:mod:`.behaviour`): an ``nn.Embedding`` subclass under ``transformers.models`` with a
scalar ``embed_scale`` and no other parameter whose forward, on ids within its vocabulary (its first, last and
padding rows and random ones), gives ``W[a]`` times ``s`` (a tensor ``s`` cast to the weight's dtype first, as
Gemma's; a number as BART's), in the weight's dtype.

Example:
    >>> from torch import nn
    >>> from metareweight.core.layers import rule_for
    >>> class GemmaTextScaledWordEmbedding(nn.Embedding):  # the name alone does not match
    ...     def forward(self, input_ids):
    ...         return super().forward(input_ids) * 2.0
    >>> rule_for(GemmaTextScaledWordEmbedding(5, 2)) is None
    True
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from .base import register_layer_rule
from .behaviour import forward_replaced, in_package, own_parameters, stand_in, takes_one_input
from .embedding import EmbeddingRule

PATTERN = "transformers.models.*"


class HFScaledEmbeddingRule(EmbeddingRule):
    """``op(a, U) = s U[a]``; :meth:`mask` gives the rows' share ``s δ`` (padding row zeroed), which the embedding
    adjoint and the fast method's row-wise step sum, so :meth:`per_sample_dot` pairs ``op``'s output with the
    unscaled ``δ``."""

    kind = "hf_scaled_embedding"

    def describes(self, module_type):
        return in_package(module_type, "transformers.models") and issubclass(module_type, nn.Embedding) \
            and takes_one_input(module_type.forward)

    def probes(self, module, generator):
        n = module.num_embeddings
        ends = [0, n - 1] + ([] if module.padding_idx is None else [module.padding_idx % n])
        ids = torch.cat([torch.tensor(ends), torch.randint(0, n, (6 - len(ends),), generator=generator)])
        yield stand_in(module), (ids.reshape(2, 3).to(module.weight.device),)

    def expected_output(self, module, ids):
        return self.op(module, ids, module.weight)

    def applies(self, module):
        s = getattr(module, "embed_scale", None)
        scalar = isinstance(s, numbers.Real) or (torch.is_tensor(s) and s.numel() == 1)
        return scalar and not forward_replaced(module) and own_parameters(module) == {"weight"} \
            and super().applies(module)

    def scale(self, module, like: Tensor):
        s = module.embed_scale
        return s.to(module.weight.dtype).to(like.dtype) if torch.is_tensor(s) else s

    def op(self, module, a, weight):
        out = super().op(module, a, weight)
        return out * self.scale(module, out)

    def op_on_rows(self, module, a, rows, weight_rows):
        out = super().op_on_rows(module, a, rows, weight_rows)
        return out * self.scale(module, out)

    def mask(self, module, a, delta):
        return super().mask(module, a, delta) * self.scale(module, delta)

    def per_sample_dot(self, module, a, delta, out):
        return (super().mask(module, a, delta) * out).reshape(a.shape[0], -1).sum(1)


register_layer_rule(PATTERN, HFScaledEmbeddingRule())
