"""``nn.Embedding``: a gather; ``op(a, U) = U[a]``, adjoint an ``index_add`` (the padding row gets no gradient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerRule, register_layer_rule, row_positions


class EmbeddingRule(LayerRule):
    """Lookups ``(B, ...)`` of index tensors. Shared lookups of batch size 1 (position/token-type ids broadcast over
    the batch) are expanded over the batch so each sample gets its own output gradient. A lookup reads only the
    rows its ids index (``row_lookup``): the fast method's virtual step of a large table runs on the rows the meta
    batch reads.

    Example (rows 2 and 5 of a 6-row table; the other rows read as zero):
        >>> emb = nn.Embedding(6, 2)
        >>> EmbeddingRule().op_on_rows(emb, torch.tensor([[5, 1]]), torch.tensor([2, 5]), torch.ones(2, 2)).tolist()
        [[[1.0, 1.0], [0.0, 0.0]]]
    """

    kind = "embedding"
    broadcast = True
    row_lookup = True

    def applies(self, module):
        # max_norm edits the weight in place; scale_grad_by_freq couples samples; sparse gradients are not dense
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    def batched(self, module, a):
        return a.dim() >= 1

    def op(self, module: nn.Module, a: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(a, weight, module.padding_idx)

    def rows_read(self, module, a):
        return a.reshape(-1).contiguous()

    def op_on_rows(self, module, a, rows, weight_rows):
        pos, hit = row_positions(rows, a.contiguous())
        pad = module.padding_idx
        if pad is not None:  # the padding row gets no gradient, as autograd's lookup gives it none
            at, found = row_positions(rows, torch.tensor(pad, device=rows.device))
            pad = int(at) if bool(found) else None
        out = F.embedding(pos, weight_rows, pad)
        return out if bool(hit.all()) else out * hit.unsqueeze(-1).to(out.dtype)

    def mask(self, module, a, delta):
        if module.padding_idx is not None:
            return delta * (a != module.padding_idx).unsqueeze(-1).to(delta.dtype)
        return delta

    def weight_grad(self, module, a, delta):
        w = module.weight
        out = torch.zeros(w.shape, dtype=delta.dtype, device=delta.device)
        return out.index_add_(0, a.reshape(-1), self.mask(module, a, delta).reshape(-1, w.shape[1]))


register_layer_rule(nn.Embedding, EmbeddingRule())
