"""Per-layer activations and output gradients, captured with forward hooks, for layers with a closed-form rule.

For a layer ``z = op(a, W) + b`` that is linear in ``W`` (the rules of :mod:`metareweight.core.layers`: ``Linear``
with any leading dims, ``Conv1d/2d/3d``, ``Embedding``, ``LayerNorm``, ``RMSNorm`` and any user-registered rule), the
gradient of any per-sample loss is ``∇_W ℓ_i = op_a*(δ_i)`` (the adjoint of ``W ↦ op(a_i, W)`` applied to
``δ_i = ∂ℓ_i/∂z_i``), so

    ∇_W ℓ_i · U = ⟨δ_i, op(a_i, U)⟩          (one forward of the layer with weight U, no per-sample gradient)
    Σ_i w_i ∇_W ℓ_i = op_a*(w ⊙ δ)           (the ordinary weight gradient with re-weighted output gradients)

:class:`LayerCall` holds one call's ``(a, z)`` and its rule; :func:`capture_calls` records every call of the hooked
layers during a forward (a module called twice gives two calls: weight sharing); :func:`leaf_uses` counts how often
each parameter enters an autograd graph, so a parameter also used outside its layer (and hence not covered by the
captured calls) can be detected.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2)
    >>> with capture_calls(lin, lambda m, call: None) as calls:
    ...     _ = lin(torch.randn(4, 3))
    >>> len(calls), calls[0].kind, calls[0].samples
    (1, 'linear', 4)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import LayerRule, rule_for


def closed_form_kind(module: nn.Module) -> Optional[str]:
    """The ``kind`` of the rule registered for the module (``"linear"``, ``"conv"``, ...), or None."""
    rule = rule_for(module)
    return None if rule is None else rule.kind


@dataclass
class LayerCall:
    """One call of a layer with a rule: its captured activation ``a`` (``input``), output ``z`` and the names of
    its parameters. The closed forms are the rule's, applied to this call."""

    module: nn.Module
    rule: LayerRule
    input: Tensor
    output: Tensor
    weight: Optional[str]
    bias: Optional[str]
    version: int = 0  # the output's version counter when recorded
    regrouped: bool = False  # dim 0 was (samples x rows), grouped by sample as a guess

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def samples(self) -> int:
        return self.input.shape[0] if self.input.dim() else 0

    def batched(self) -> bool:
        """Whether dim 0 of the activation can index samples."""
        return self.input.dim() > 0 and self.rule.batched(self.module, self.input)

    def intact(self) -> bool:
        """Whether the output is as the layer returned it: not changed in place since (``h = emb(ids);
        h *= scale``), which would make the gradient with respect to it not the layer's ``δ``."""
        return self.output._version == self.version

    def op(self, weight: Tensor) -> Tensor:
        """The layer's bias-free output for weight ``weight`` (linear in it)."""
        return self.rule.op(self.module, self.input, weight)

    def per_sample_dot(self, delta: Tensor, out: Tensor) -> Tensor:
        """``(B,)``: ``⟨δ_i, out_i⟩`` summed over every non-batch dimension."""
        return self.rule.per_sample_dot(self.module, self.input, delta, out)

    def bias_dot(self, delta: Tensor, u: Tensor) -> Tensor:
        """``(B,)``: ``∇_b ℓ_i · u``."""
        return self.rule.bias_dot(self.module, self.input, delta, u)

    def weight_grad(self, delta: Tensor) -> Tensor:
        """``Σ_i ∇_W`` for output gradients ``delta`` (already weighted per sample)."""
        return self.rule.weight_grad(self.module, self.input, delta)

    def bias_grad(self, delta: Tensor) -> Tensor:
        return self.rule.bias_grad(self.module, self.input, delta)

    def rows(self, tensor: Tensor) -> Tensor:
        """(Gram rules) the call's activation or output as ``(rows, features)``, rows ordered sample-major."""
        return self.rule.rows(self.module, tensor)

    def detach(self) -> "LayerCall":
        return LayerCall(self.module, self.rule, self.input.detach(), self.output.detach(), self.weight, self.bias)


Transform = Callable[[nn.Module, LayerCall], Optional[Tensor]]


@contextlib.contextmanager
def capture_calls(model: nn.Module, transform: Transform, names: Optional[Mapping[int, str]] = None, *,
                  batch_size: Optional[int] = None, only: Optional[Collection[str]] = None
                  ) -> Iterator[List[LayerCall]]:
    """Record each call of a layer with a rule inside ``model`` while the context is open.

    Args:
        model: the module whose sub-modules are hooked (hooks are removed on exit).
        transform: ``transform(module, call)`` may return a replacement output (used for a low-rank weight update);
            the recorded ``call.output`` is what the layer finally returns.
        names: ``id(tensor) -> parameter name`` of the tensors substituted for the parameters (``functional_call``);
            with it, only calls with a named weight or bias are recorded, and a call's unnamed parameters are None.
        batch_size: the number of samples; a call of a ``broadcast`` rule with batch size 1 (a lookup shared by
            every sample) has its activation and output expanded to it, so each sample gets its own gradient; a call
            of a ``regroups`` rule whose dim 0 is a multiple ``k`` of it (OPT's feed-forward on ``(B·L, d)`` rows) is
            recorded grouped as ``(B, k, ...)``, taking the rows as sample-major (``call.regrouped``: a guess the
            caller must check).
        only: record only the calls whose weight name is in this collection.
    """
    calls: List[LayerCall] = []
    handles = []
    lookup = names or {}

    def record(module: nn.Module, rule: LayerRule, a: Tensor, output: Tensor) -> Tensor:
        """Record one call (``a``: the rule's captured activation); returns the output to use downstream."""
        w, b = rule.weight(module), rule.bias(module)
        wn, bn = (None if t is None else lookup.get(id(t)) for t in (w, b))
        if (names is not None and wn is None and bn is None) or (only is not None and wn not in only):
            return output  # (looked up per call: functional_call substitutes the parameters only during the forward)
        call = LayerCall(module, rule, a, output, wn, bn)
        flat = None
        if rule.broadcast and batch_size and batch_size > 1 and a.dim() and a.shape[0] == 1 \
                and output.dim() and output.shape[0] == 1:
            call.input = a.expand(batch_size, *a.shape[1:])
            call.output = output.expand(batch_size, *output.shape[1:])
        elif rule.regroups and batch_size and a.dim() >= 2 and output.dim() >= 2 and a.shape[0] == output.shape[0] \
                and a.shape[0] != batch_size and a.shape[0] % batch_size == 0:
            # rows of every sample flattened into dim 0 (B·L, d), taken as sample-major: grouped (B, L, d) so that
            # the output the model goes on with is a view of the recorded one (the attribution check judges it)
            flat, k = output.shape, a.shape[0] // batch_size
            call.input = a.reshape(batch_size, k, *a.shape[1:])
            call.output = output.reshape(batch_size, k, *output.shape[1:])
            call.regrouped = True
        replaced = transform(module, call)
        if replaced is not None:
            call.output = replaced
        call.version = call.output._version
        calls.append(call)
        return call.output if flat is None else call.output.reshape(flat)

    def hook(module, args, output):
        rule = rule_for(module)
        if rule is None or not torch.is_tensor(output):
            return None
        w, b = rule.weight(module), rule.bias(module)
        if names is not None and not any(t is not None and id(t) in lookup for t in (w, b)):
            return None
        a = rule.capture(module, args, output)
        if a is None:
            return None
        new = record(module, rule, a, output)
        return None if new is output else new

    overridden = []
    if only is None or only:
        for m in model.modules():
            rule = rule_for(m)
            if rule is None:
                continue
            if getattr(rule, "composite", False):  # the rule runs the forward itself (restored on exit)
                overridden.append((m, m.__dict__.get("forward")))
                m.forward = _composite_forward(m, rule, record)
            else:
                handles.append(m.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
        for m, own in reversed(overridden):
            if own is None:
                del m.forward
            else:
                m.forward = own


def _composite_forward(module: nn.Module, rule: LayerRule, record):
    original = module.forward

    def forward(*args, **kwargs):
        out = rule.forward(module, record, *args, **kwargs)
        return original(*args, **kwargs) if out is NotImplemented else out

    return forward


def leaf_uses(roots: Sequence[Tensor], leaves: Mapping[int, str]) -> Dict[str, int]:
    """How many graph edges lead from ``roots`` into each leaf tensor (``id -> name``); one per op that used it.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> leaf_uses([(w * 2 + w).sum()], {id(w): "w"})
        {'w': 2}
    """
    counts = {n: 0 for n in leaves.values()}
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is None:
                stack.append(nxt)
            elif id(var) in leaves:
                counts[leaves[id(var)]] += 1
    return counts
