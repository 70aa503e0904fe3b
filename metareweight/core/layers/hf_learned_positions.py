"""The learned position embeddings of BART and its relatives (``BartLearnedPositionalEmbedding``, MBART's, PLBART's,
...): an ``nn.Embedding`` subclass whose forward takes the token ids (or any ``(batch, length, ...)`` tensor, for its
shape) and looks up the positions ``cache_length, ..., cache_length + length - 1``, or given 1-d ``position_ids``,
shifted by a fixed ``offset``. Registered by pattern so ``transformers`` is not imported.

Rules go by exact type and the forward's input is not what it looks up, so without this rule the table took the
exact JVP path (in BART's encoder and decoder both: a forward-mode pass over the model per meta step). The rule
is *composite*: while the fast method captures a forward, the layer's call computes the rows itself
(:func:`position_rows`: one row of positions per sample, or given positions shared by every sample, which the
Embedding rule expands over the batch), looks them up and records the lookup for the Embedding rule's closed forms;
a call with other arguments runs the class's own forward, uncaptured (its table then keeps the JVP path). Matched by
behaviour (:mod:`.behaviour`): an ``nn.Embedding`` subclass under ``transformers.models`` with an integer ``offset``,
whose forward, on a stand-in with a random table, gives :func:`learned_positions` for probe shapes with and without
a cache length and with given positions.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from metareweight.core.layers import rule_for
    >>> class Positions(nn.Embedding):  # not under transformers: a user's layer is the user's to register
    ...     offset = 2
    ...     def forward(self, input_ids, cache_length=0):
    ...         return super().forward(torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1) + 2)
    >>> rule_for(Positions(8, 3)) is None
    True
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register_layer_rule
from .behaviour import forward_replaced, in_package, own_parameters, probe_tensor, stand_in
from .embedding import EmbeddingRule

PATTERN = "transformers.models.*"


def position_rows(module: nn.Module, input_ids: Tensor, cache_length: int = 0, positions: Optional[Tensor] = None
                  ) -> Tensor:
    """The rows looked up, ``offset`` plus each position: ``(batch, length)`` for ``cache_length, ...,
    cache_length + length - 1`` in every sample; ``(1, length)`` for given 1-d ``positions``, shared by every
    sample."""
    if positions is None:
        batch, length = input_ids.shape[:2]
        positions = torch.arange(cache_length, cache_length + length, dtype=torch.long, device=module.weight.device)
        positions = positions.expand(batch, -1)
    else:
        positions = positions.unsqueeze(0)
    return positions + module.offset


def learned_positions(module: nn.Module, input_ids: Tensor, cache_length: int = 0,
                      position_ids: Optional[Tensor] = None) -> Tensor:
    """The table's rows for :func:`position_rows`, ``(batch or 1, length, dim)``."""
    return F.embedding(position_rows(module, input_ids, cache_length, position_ids), module.weight,
                       module.padding_idx)


class HFLearnedPositionsRule(EmbeddingRule):
    """The Embedding rule's closed forms on the position ids the layer computes (a composite rule)."""

    kind = "hf_learned_positions"
    composite = True

    def describes(self, module_type):
        if not (in_package(module_type, "transformers.models") and issubclass(module_type, nn.Embedding)):
            return False
        try:
            params = list(inspect.signature(module_type.forward).parameters.values())
        except (TypeError, ValueError):
            return False
        return len(params) >= 3 and params[2].default == 0 and all(p.default is not p.empty for p in params[2:])

    def applies(self, module):
        return isinstance(getattr(module, "offset", None), int) and not forward_replaced(module) \
            and own_parameters(module) == {"weight"} and super().applies(module)

    def probes(self, module, generator):
        weight = module.weight
        target = stand_in(module, weight=probe_tensor(generator, weight.shape, weight.dtype, weight.device))
        ids = torch.zeros(2, 3, dtype=torch.long, device=weight.device)
        yield target, (ids,)
        yield target, (ids[:, :2], 2)
        yield target, (ids.float(),)  # (BART's encoder passes embeddings, for their shape)
        if "position_ids" in inspect.signature(type(module).forward).parameters:
            yield target, (ids, 0, torch.tensor([1, 0, 2], device=weight.device))

    def expected_output(self, module, input_ids, cache_length=0, position_ids=None):
        return learned_positions(module, input_ids, cache_length, position_ids)

    def forward(self, module: nn.Module, record, input_ids, cache_length=0, position_ids=None, **kwargs):
        """The lookup recorded; the class's own forward (uncaptured) for other arguments or 2-d position ids."""
        if kwargs or (position_ids is not None and position_ids.dim() != 1):
            return NotImplemented
        ids = position_rows(module, input_ids, cache_length, position_ids)
        return record(module, self, ids, F.embedding(ids, module.weight, module.padding_idx))


register_layer_rule(PATTERN, HFLearnedPositionsRule())
