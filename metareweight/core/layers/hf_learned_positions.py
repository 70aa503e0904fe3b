"""The learned position embeddings of BART and OPT and their relatives (``BartLearnedPositionalEmbedding``,
MBART's, PLBART's, ...; ``OPTLearnedPositionalEmbedding``, BioGPT's): an ``nn.Embedding`` subclass whose forward
takes the token ids (BART's: or any ``(batch, length, ...)`` tensor, for its shape) or the attention mask (OPT's),
computes the positions and looks them up shifted by a fixed ``offset``. Registered by pattern so ``transformers``
is not imported.

Rules go by exact type and the forward's input is not what it looks up, so without these rules the table took the
exact JVP path (in BART's encoder and decoder both: a forward-mode pass over the model per meta step). The rules
are *composite*: while the fast method captures a forward, the layer's call computes the rows itself, looks them
up and records the lookup for the Embedding rule's closed forms. BART's form (:func:`position_rows`):
``cache_length, ..., cache_length + length - 1`` in every sample, or given 1-d positions shared by every sample
(which the Embedding rule expands over the batch); OPT's (:func:`mask_position_rows`): each token's position
counted over the mask's ones, or given 2-d positions. A call with other arguments runs the class's own forward,
uncaptured (its table then keeps the JVP path). Matched by behaviour (:mod:`.behaviour`): an ``nn.Embedding``
subclass under ``transformers.models`` with an integer ``offset``, whose forward, on a stand-in with a random table,
gives the form's lookup on probe inputs with and without a cache length and given positions.

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
                  ) -> Optional[Tensor]:
    """BART's rows, ``offset`` plus each position: ``(batch, length)`` for ``cache_length, ...,
    cache_length + length - 1`` in every sample; ``(1, length)`` for given 1-d ``positions``, shared by every
    sample (None for other ``positions``)."""
    if positions is None:
        batch, length = input_ids.shape[:2]
        positions = torch.arange(cache_length, cache_length + length, dtype=torch.long, device=module.weight.device)
        positions = positions.expand(batch, -1)
    elif positions.dim() == 1:
        positions = positions.unsqueeze(0)
    else:
        return None
    return positions + module.offset


def mask_position_rows(module: nn.Module, attention_mask: Tensor, cache_length: int = 0,
                       positions: Optional[Tensor] = None) -> Optional[Tensor]:
    """OPT's rows, ``offset`` plus each token's position counted over the attention mask's ones (a padding token
    gets -1), from ``cache_length`` on: ``(batch, length)``; or given 2-d ``positions`` (None for other
    ``positions``)."""
    if positions is None:
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()[:, cache_length:]
    elif positions.dim() != 2:
        return None
    return positions + module.offset


class HFLearnedPositionsRule(EmbeddingRule):
    """The Embedding rule's closed forms on the position ids the layer computes (a composite rule), in BART's
    form (:func:`position_rows`)."""

    kind = "hf_learned_positions"
    composite = True
    rows_of = staticmethod(position_rows)

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

    def probe_inputs(self, device) -> list:
        """The arguments the behavioural check calls the forward with."""
        ids = torch.zeros(2, 3, dtype=torch.long, device=device)
        # (BART's encoder passes embeddings, for their shape)
        return [(ids,), (ids[:, :2], 2), (ids.float(),), (ids, 0, torch.tensor([1, 0, 2], device=device))]

    def probes(self, module, generator):
        weight = module.weight
        target = stand_in(module, weight=probe_tensor(generator, weight.shape, weight.dtype, weight.device))
        takes_positions = "position_ids" in inspect.signature(type(module).forward).parameters
        return [(target, args) for args in self.probe_inputs(weight.device) if takes_positions or len(args) < 3]

    def expected_output(self, module, first, cache_length=0, position_ids=None):
        rows = self.rows_of(module, first, cache_length, position_ids)
        if rows is None:
            raise ValueError("position ids of a form the rule does not state")  # (a probe: not matched)
        return F.embedding(rows, module.weight, module.padding_idx)

    def forward(self, module: nn.Module, record, first, cache_length=0, position_ids=None, **kwargs):
        """The lookup recorded; the class's own forward (uncaptured) for other arguments or position ids."""
        rows = None if kwargs else self.rows_of(module, first, cache_length, position_ids)
        if rows is None:
            return NotImplemented
        return record(module, self, rows, F.embedding(rows, module.weight, module.padding_idx))


class HFMaskPositionsRule(HFLearnedPositionsRule):
    """OPT's and BioGPT's form (:func:`mask_position_rows`): positions counted over the attention mask."""

    kind = "hf_mask_positions"
    rows_of = staticmethod(mask_position_rows)

    def probe_inputs(self, device) -> list:
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], device=device)
        return [(mask,), (mask, 2), (mask, 0, torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], device=device))]


register_layer_rule(PATTERN, HFLearnedPositionsRule())
register_layer_rule(PATTERN, HFMaskPositionsRule())
