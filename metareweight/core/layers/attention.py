"""``nn.MultiheadAttention``: its projections in closed form.

The module calls ``F.multi_head_attention_forward`` with ``in_proj_weight`` directly, so no Linear hook sees the
query/key/value projection, and ``out_proj``'s forward is never called. While the fast method captures a forward,
:class:`MultiheadAttentionRule` runs self-attention (``query is key is value``, packed in-projection) in decomposed
form instead: the packed projection ``x W_inᵀ + b_in`` as one Linear call (weight ``in_proj_weight``), the attention
(masks merged as torch does), and ``out_proj`` called as a module (a Linear, so its own rule captures it). Anything
else (cross-attention, ``bias_k``, ``add_zero_attn``, ``is_causal``, dropout while training, unbatched input) runs
the module's own forward, and its parameters take the exact JVP fallback.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerRule, register_layer_rule
from .linear import LinearRule


class InProjectionRule(LinearRule):
    """The packed query/key/value projection of a ``MultiheadAttention``: a Linear with ``in_proj_weight``."""

    kind = "attention_in_proj"

    def weight(self, module):
        return module.in_proj_weight

    def bias(self, module):
        return module.in_proj_bias


IN_PROJECTION = InProjectionRule()
Record = Callable[[nn.Module, LayerRule, Tensor, Tensor], Tensor]


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttentionRule(LayerRule):
    """A *composite* rule: it runs the module's forward itself and records its inner calls with ``record``."""

    kind = "multihead_attention"
    composite = True

    def weight(self, module):
        return None

    def bias(self, module):
        return None

    def forward(self, module: nn.Module, record: Record, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False):
        m = module
        if not (query is key and key is value) or not m._qkv_same_embed_dim or m.bias_k is not None \
                or m.add_zero_attn or is_causal or (m.dropout > 0 and m.training) or query.dim() != 3:
            return NotImplemented
        x = query if m.batch_first else query.transpose(0, 1)
        B, T, E = x.shape
        h = m.num_heads
        d = E // h
        qkv = record(m, IN_PROJECTION, x, F.linear(x, m.in_proj_weight, m.in_proj_bias))
        q, k, v = (t.reshape(B, T, h, d).transpose(1, 2) for t in qkv.chunk(3, -1))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(B, h, T, T)
        kpm = _additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(B, 1, 1, T)
            mask = kpm if mask is None else mask + kpm
        weights = None
        if need_weights:
            scores = (q / math.sqrt(d)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            p = torch.softmax(scores, -1)
            out = p @ v
            weights = p.mean(1) if average_attn_weights else p
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = m.out_proj(out.transpose(1, 2).reshape(B, T, E))
        return (out if m.batch_first else out.transpose(0, 1)), weights


register_layer_rule(nn.MultiheadAttention, MultiheadAttentionRule())
# out_proj is a Linear subclass that only marks it for quantisation; its forward is Linear's
register_layer_rule(nn.modules.linear.NonDynamicallyQuantizableLinear, LinearRule())
