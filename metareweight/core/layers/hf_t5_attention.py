"""T5's relative position bias (T5, mT5, LongT5, Switch Transformers, UDOP, Pop2Piano): one ``nn.Embedding`` lookup of
``(query, key)`` buckets that every sample shares (no batch dimension), added to the attention scores.

Without a rule the lookup is not a per-sample call (its activation's dim 0 is the query length, not the batch), so
its table took the exact JVP path, and where the query length equals the batch size the Embedding rule would read it
as one. While the fast method captures a forward, :class:`T5RelativeBiasRule` (a *composite* rule on the attention
module) runs the attention's own forward with ``compute_bias`` looking the buckets up with a batch dimension of 1,
``(1, q, k)``: the Embedding rule then expands the shared lookup over the batch (as BERT's ``(1, L)`` position ids),
so each sample gets its own output gradient, and the bias ``(1 or B, heads, q, k)`` broadcasts as before. The values
are those of the original ``compute_bias`` exactly: registered by pattern, the rule is used for an attention class
under ``transformers.models`` whose ``compute_bias(query_length, key_length, device=None, past_seen_tokens=0)``
gives what :func:`relative_bias` computes (:mod:`.behaviour`: run on a stand-in whose table is a fresh random
``nn.Embedding`` of the same shape, so no hook of the model's fires), so ``transformers`` is not imported.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .base import LayerRule, register_layer_rule
from .behaviour import forward_replaced, in_package, own_parameters, probe_tensor, stand_in

PATTERN = "transformers.models.*"

#: the signature of ``compute_bias`` the rule replaces
BIAS_PARAMETERS = ("self", "query_length", "key_length", "device", "past_seen_tokens")


def relative_bias(module: nn.Module, query_length: int, key_length: int, device=None, past_seen_tokens: int = 0
                  ) -> Tensor:
    """T5's bias ``(1, heads, q, k)``: the table row of each ``(query, key)`` pair's bucket (the module's
    ``_relative_position_bucket`` of the offset ``key - query``, queries starting at ``past_seen_tokens``),
    looked up as a batch of one (which the capture expands over the batch)."""
    table = module.relative_attention_bias
    device = table.weight.device if device is None else device
    queries = torch.arange(past_seen_tokens, past_seen_tokens + query_length, dtype=torch.long, device=device)
    offsets = torch.arange(key_length, dtype=torch.long, device=device).unsqueeze(0) - queries.unsqueeze(1)
    buckets = module._relative_position_bucket(offsets, bidirectional=not module.is_decoder,
                                               num_buckets=module.relative_attention_num_buckets,
                                               max_distance=module.relative_attention_max_distance)
    return table(buckets.unsqueeze(0)).permute(0, 3, 1, 2)  # (1, q, k, heads) -> (1, heads, q, k)


class T5RelativeBiasRule(LayerRule):
    """A composite rule with no parameters of its own: the lookup is captured by the Embedding rule."""

    kind = "hf_t5_relative_bias"
    composite = True
    probe_method = "compute_bias"

    def describes(self, module_type):
        method = getattr(module_type, "compute_bias", None)
        if not (in_package(module_type, "transformers.models") and inspect.isfunction(method)):
            return False
        return tuple(inspect.signature(method).parameters) == BIAS_PARAMETERS

    def applies(self, module):
        return bool(getattr(module, "has_relative_attention_bias", False)) and not forward_replaced(module) \
            and type(getattr(module, "relative_attention_bias", None)) is nn.Embedding and not own_parameters(module)

    def probes(self, module, generator):
        weight = module.relative_attention_bias.weight
        table = nn.Embedding(*weight.shape, _weight=probe_tensor(generator, weight.shape, weight.dtype, weight.device))
        target = stand_in(module, relative_attention_bias=table)
        return [(target, (3, 5)), (target, (2, 6, weight.device, 4))]

    def expected_output(self, module, *args, **kwargs):
        return relative_bias(module, *args, **kwargs)

    def weight(self, module):
        return None

    def bias(self, module):
        return None

    def forward(self, module: nn.Module, record, *args, **kwargs):
        """The module's own forward with its bias method (:attr:`probe_method`) giving :meth:`expected_output`."""
        name = self.probe_method
        if name in module.__dict__:
            return NotImplemented
        setattr(module, name, lambda *a, **kw: self.expected_output(module, *a, **kw))
        try:
            return type(module).forward(module, *args, **kwargs)
        finally:
            delattr(module, name)


register_layer_rule(PATTERN, T5RelativeBiasRule())
