"""Closed-form layer rules for the fast hypergradient, one file per layer type, registered by module type.

Built in: ``Linear`` (direct and Gram forms), ``Conv1d/2d/3d``, ``Embedding`` (incl. lookups broadcast over the
batch), ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``'s projections (self-attention); and, registered by name so
that ``transformers`` is not imported, Hugging Face's ``Conv1D`` (GPT-2), the RMSNorms it defines per model (the
Llama form: Llama, Qwen2/3, Mistral, Phi-3, ...; Gemma 1-3's ``1 + W`` form; Gemma 3n's / 4's; OLMo-2's and Helium's
float32 forms; ``T5LayerNorm``), T5's and MPNet's relative position biases (lookups shared by every sample), its
scaled word embeddings (Gemma, BART), BART's and OPT's learned position embeddings, its element-wise affine layers
(MobileBERT's ``NoNorm``) and its ``nn.Linear`` subclasses that compute the Linear's map (Falcon), each matched
by its behaviour: the class's forward, run once on small probe inputs, must give what the rule states the layer
computes (:mod:`.behaviour`).
Add your own with :func:`register_layer_rule` (see :mod:`.base`).

Example:
    >>> import torch
    >>> rule_for(torch.nn.LayerNorm(4)).kind, rule_for(torch.nn.GELU()) is None
    ('layer_norm', True)
"""

from .attention import InProjectionRule, MultiheadAttentionRule
from .base import LayerRule, register_layer_rule, rule_for
from .conv import ConvRule
from .embedding import EmbeddingRule
from .hf_affine import HFAffineRule
from .hf_conv1d import HFConv1DRule
from .hf_embedding import HFScaledEmbeddingRule
from .hf_learned_positions import HFLearnedPositionsRule, HFMaskPositionsRule
from .hf_linear import HFLinearRule
from .hf_mpnet_attention import MPNetRelativeBiasRule
from .hf_rms_norm import HFGemma4RMSNormRule, HFGemmaRMSNormRule, HFRMSNormRule, HFT5LayerNormRule
from .hf_t5_attention import T5RelativeBiasRule
from .layer_norm import ElementwiseAffineRule, LayerNormRule
from .linear import LinearRule
from .rms_norm import RMSNormRule

__all__ = ["LayerRule", "register_layer_rule", "rule_for", "LinearRule", "ConvRule", "EmbeddingRule",
           "ElementwiseAffineRule", "LayerNormRule", "RMSNormRule", "MultiheadAttentionRule", "InProjectionRule",
           "HFConv1DRule", "HFRMSNormRule", "HFGemmaRMSNormRule", "HFGemma4RMSNormRule", "HFT5LayerNormRule",
           "HFScaledEmbeddingRule", "T5RelativeBiasRule", "HFLinearRule",
           "MPNetRelativeBiasRule", "HFLearnedPositionsRule", "HFMaskPositionsRule",
           "HFAffineRule"]
