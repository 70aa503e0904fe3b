"""Closed-form layer rules for the fast hypergradient, one file per layer type, registered by module type.

Built in: ``Linear`` (direct and Gram forms), ``Conv1d/2d/3d``, ``Embedding`` (incl. lookups broadcast over the
batch), ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``'s projections (self-attention). Add your own with :func:`register_layer_rule` (see :mod:`.base`).

Example:
    >>> import torch
    >>> rule_for(torch.nn.LayerNorm(4)).kind, rule_for(torch.nn.GELU()) is None
    ('layer_norm', True)
"""

from .attention import InProjectionRule, MultiheadAttentionRule
from .base import LayerRule, register_layer_rule, rule_for
from .conv import ConvRule
from .embedding import EmbeddingRule
from .layer_norm import ElementwiseAffineRule, LayerNormRule
from .linear import LinearRule
from .rms_norm import RMSNormRule

__all__ = ["LayerRule", "register_layer_rule", "rule_for", "LinearRule", "ConvRule", "EmbeddingRule",
           "ElementwiseAffineRule", "LayerNormRule", "RMSNormRule", "MultiheadAttentionRule", "InProjectionRule"]
