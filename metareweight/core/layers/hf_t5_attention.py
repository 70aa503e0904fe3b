"""T5's relative position bias (T5, mT5, LongT5, Switch Transformers, UDOP, Pop2Piano): one ``nn.Embedding`` lookup of
``(query, key)`` buckets that every sample shares (no batch dimension), added to the attention scores.

Without a rule the lookup is not a per-sample call (its activation's dim 0 is the query length, not the batch), so
its table took the exact JVP path, and where the query length equals the batch size the Embedding rule would read it
as one. While the fast method captures a forward, :class:`T5RelativeBiasRule` (a *composite* rule on the attention
module) runs the attention's own forward with ``compute_bias`` looking the buckets up with a batch dimension of 1,
``(1, q, k)``: the Embedding rule then expands the shared lookup over the batch (as BERT's ``(1, L)`` position ids),
so each sample gets its own output gradient, and the bias ``(1 or B, heads, q, k)`` broadcasts as before. The values
are those of the original ``compute_bias`` exactly; registered by pattern for the attention classes whose
``compute_bias`` compiles to T5's (:mod:`.forms`), so ``transformers`` is not imported.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerRule, register_layer_rule
from .forms import forward_replaced, has_form, in_package

PATTERN = "transformers.models.*"


class _T5(nn.Module):  # the form, verbatim from transformers 5.x (compared by code; never run)
    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        if device is None:
            device = self.relative_attention_bias.weight.device
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_seen_tokens
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position
        relative_position_bucket = self._relative_position_bucket(
            relative_position,
            bidirectional=(not self.is_decoder),
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(relative_position_bucket)
        values = values.permute([2, 0, 1]).unsqueeze(0)
        return values


def _shared_lookup_bias(module: nn.Module):
    """``module.compute_bias`` with the bucket lookup given a batch dimension of 1 (same values)."""

    def compute_bias(query_length, key_length, device=None, past_seen_tokens=0):
        if device is None:
            device = module.relative_attention_bias.weight.device
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_seen_tokens
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        bucket = module._relative_position_bucket(memory_position - context_position,
                                                  bidirectional=(not module.is_decoder),
                                                  num_buckets=module.relative_attention_num_buckets,
                                                  max_distance=module.relative_attention_max_distance)
        values = module.relative_attention_bias(bucket.unsqueeze(0))  # (1, q, k, heads), expanded over the batch
        return values.permute([0, 3, 1, 2])  # by the capture: (B, heads, q, k)

    return compute_bias


class T5RelativeBiasRule(LayerRule):
    """A composite rule with no parameters of its own: the lookup is captured by the Embedding rule."""

    kind = "hf_t5_relative_bias"
    composite = True

    def describes(self, module_type):
        return in_package(module_type, "transformers.models") and has_form(module_type, (nn.Module,),
                                                                           compute_bias=_T5.compute_bias)

    def applies(self, module):
        return bool(getattr(module, "has_relative_attention_bias", False)) and not forward_replaced(module) \
            and isinstance(getattr(module, "relative_attention_bias", None), nn.Embedding)

    def weight(self, module):
        return None

    def bias(self, module):
        return None

    def forward(self, module: nn.Module, record, *args, **kwargs):
        if "compute_bias" in module.__dict__:
            return NotImplemented
        module.compute_bias = _shared_lookup_bias(module)
        try:
            return type(module).forward(module, *args, **kwargs)
        finally:
            del module.compute_bias


register_layer_rule(PATTERN, T5RelativeBiasRule())
