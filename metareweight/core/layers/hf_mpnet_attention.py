"""MPNet's relative position bias: one ``nn.Embedding`` lookup of ``(query, key)`` buckets in the encoder, shared by
every sample and every layer, expanded over the batch and added to the attention scores.

The lookup's activation is ``(L, L)`` with no batch dimension, so without a rule its table took the exact JVP path,
and where a batch's padded length equals its size the lookup passed for a per-sample call (the attribution check
then finds the mismatch and keeps it on the JVP path). While the fast method captures a forward,
:class:`MPNetRelativeBiasRule` (a *composite* rule on the encoder, as :class:`.T5RelativeBiasRule` on T5's attention)
runs the encoder's own forward with ``compute_position_bias`` looking the buckets up as a batch of one,
``(1, L, L)``, which the Embedding rule expands over the batch, so each sample gets its own output gradient. Registered
by pattern (``transformers`` is not imported) and used for an encoder class under ``transformers.models`` whose
``compute_position_bias(x, position_ids=None, num_buckets=32)`` gives what :func:`position_bias` computes on probe
inputs (:mod:`.behaviour`: on a stand-in whose table is a fresh random ``nn.Embedding`` of the same shape).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from metareweight.core.layers import rule_for
    >>> class Encoder(nn.Module):  # a user's encoder with a method of the same name is not matched
    ...     def compute_position_bias(self, x, position_ids=None, num_buckets=32):
    ...         return x
    >>> rule_for(Encoder()) is None
    True
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .base import register_layer_rule
from .behaviour import forward_replaced, in_package, own_parameters, probe_tensor, stand_in
from .hf_t5_attention import T5RelativeBiasRule

PATTERN = "transformers.models.*"

#: the signature of ``compute_position_bias`` the rule replaces
BIAS_PARAMETERS = ("self", "x", "position_ids", "num_buckets")


def position_bias(module: nn.Module, x: Tensor, position_ids=None, num_buckets: int = 32) -> Tensor:
    """MPNet's bias ``(batch, heads, L, L)`` for hidden states ``x`` ``(batch, L, ...)``: the table row of the bucket
    (the module's ``relative_position_bucket``) of each offset ``key - query``, looked up as a batch of one and
    expanded over the batch. Given ``position_ids``, the class's own method."""
    if position_ids is not None:
        return type(module).compute_position_bias(module, x, position_ids, num_buckets)
    batch, length = x.shape[0], x.shape[1]
    positions = torch.arange(length, dtype=torch.long, device=x.device)
    offsets = positions.unsqueeze(0) - positions.unsqueeze(1)  # [query, key] = key - query
    buckets = module.relative_position_bucket(offsets, num_buckets=num_buckets)
    values = module.relative_attention_bias(buckets.unsqueeze(0))  # (1, L, L, heads)
    return values.permute(0, 3, 1, 2).expand(batch, -1, length, length).contiguous()


class MPNetRelativeBiasRule(T5RelativeBiasRule):
    """A composite rule with no parameters of its own: the lookup is captured by the Embedding rule."""

    kind = "hf_mpnet_relative_bias"
    probe_method = "compute_position_bias"

    def describes(self, module_type):
        method = getattr(module_type, self.probe_method, None)
        if not (in_package(module_type, "transformers.models") and inspect.isfunction(method)
                and callable(getattr(module_type, "relative_position_bucket", None))):
            return False
        return tuple(inspect.signature(method).parameters) == BIAS_PARAMETERS

    def applies(self, module):
        return not forward_replaced(module) and not own_parameters(module) \
            and type(getattr(module, "relative_attention_bias", None)) is nn.Embedding

    def probes(self, module, generator):
        weight = module.relative_attention_bias.weight
        table = nn.Embedding(*weight.shape, _weight=probe_tensor(generator, weight.shape, weight.dtype, weight.device))
        target = stand_in(module, relative_attention_bias=table)
        for shape in ((2, 5, 3), (3, 4, 3)):
            yield target, (probe_tensor(generator, shape, weight.dtype, weight.device),)

    def expected_output(self, module, *args, **kwargs):
        return position_bias(module, *args, **kwargs)


register_layer_rule(PATTERN, MPNetRelativeBiasRule())
