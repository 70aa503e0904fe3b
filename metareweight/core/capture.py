"""Per-layer activations and output gradients, captured with forward hooks, for layers linear in their weight.

For a layer ``z = op(a, W) + b`` that is linear in ``W`` (``Linear``, ``Conv1d/2d/3d``, ``Embedding``), the gradient of
any per-sample loss is ``∇_W ℓ_i = op_a*(δ_i)`` (the adjoint of ``W ↦ op(a_i, W)`` applied to ``δ_i = ∂ℓ_i/∂z_i``), so

    ∇_W ℓ_i · U = ⟨δ_i, op(a_i, U)⟩          (one forward of the layer with weight U, no per-sample gradient)
    Σ_i w_i ∇_W ℓ_i = op_a*(w ⊙ δ)           (the ordinary weight gradient with re-weighted output gradients)

:class:`LayerCall` holds one call's ``(a, z)`` and implements these forms; :func:`capture_calls` records every call of
the supported layers during a forward (a module called twice gives two calls: weight sharing); :func:`leaf_uses`
counts how often each parameter enters an autograd graph, so a parameter also used outside its layer (and hence not
covered by the captured calls) can be detected.

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
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# exact types only: a subclass may override forward, and then the closed forms would not describe it
CLOSED_FORM_TYPES = (nn.Linear, nn.Embedding) + _CONV


def closed_form_kind(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"conv"`` or ``"embedding"`` if the module's weight gradient has a closed form, else None."""
    t = type(module)
    if t is nn.Linear:
        return "linear"
    if t in _CONV:
        return "conv"
    if t is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
        return "embedding"  # max_norm edits the weight in place; scale_grad_by_freq couples samples
    return None


@dataclass
class LayerCall:
    """One call of a supported layer: its input ``a``, output ``z`` and the names of its parameters."""

    module: nn.Module
    kind: str
    input: Tensor
    output: Tensor
    weight: Optional[str]
    bias: Optional[str]

    @property
    def samples(self) -> int:
        return self.input.shape[0] if self.input.dim() else 0

    def batched(self) -> bool:
        """Whether dim 0 of the input can index samples (Conv needs the batched layout)."""
        if self.kind == "conv":
            return self.input.dim() == self.module.weight.dim()
        return self.input.dim() >= (1 if self.kind == "embedding" else 2)

    # ---- the layer's bias-free linear map and its adjoint ---------------------------------------------------
    def op(self, weight: Tensor) -> Tensor:
        a = self.input
        if self.kind == "linear":
            return F.linear(a, weight)
        if self.kind == "conv":
            return self.module._conv_forward(a, weight, None)
        return F.embedding(a, weight, self.module.padding_idx)

    def _mask(self, delta: Tensor) -> Tensor:
        """Zero the output gradient where an Embedding reads its padding row (that row gets no gradient)."""
        if self.kind == "embedding" and self.module.padding_idx is not None:
            return delta * (self.input != self.module.padding_idx).unsqueeze(-1).to(delta.dtype)
        return delta

    def per_sample_dot(self, delta: Tensor, out: Tensor) -> Tensor:
        """``(B,)``: ``⟨δ_i, out_i⟩`` summed over every non-batch dimension."""
        return (self._mask(delta) * out).reshape(self.samples, -1).sum(1)

    def bias_dot(self, delta: Tensor, u: Tensor) -> Tensor:
        """``(B,)``: ``∇_b ℓ_i · u``."""
        d = delta.movedim(1, -1) if self.kind == "conv" else delta
        return (d @ u).reshape(self.samples, -1).sum(1)

    def weight_grad(self, delta: Tensor) -> Tensor:
        """``Σ_i ∇_W`` for output gradients ``delta`` (already weighted per sample)."""
        w = self.module.weight
        if self.kind == "linear":
            return delta.reshape(-1, w.shape[0]).T @ self.input.reshape(-1, w.shape[1])
        if self.kind == "embedding":
            out = torch.zeros(w.shape, dtype=delta.dtype, device=delta.device)
            return out.index_add_(0, self.input.reshape(-1), self._mask(delta).reshape(-1, w.shape[1]))
        m = self.module
        if m.padding_mode == "zeros" and not isinstance(m.padding, str) and w.dtype == delta.dtype == self.input.dtype:
            # the convolution's weight backward alone (autograd through op() would first redo the forward)
            return torch.ops.aten.convolution_backward(
                delta, self.input, w.detach(), None, m.stride, m.padding, m.dilation, False, [0] * len(m.stride),
                m.groups, [False, True, False])[1]
        leaf = w.detach().requires_grad_()  # padding="same" or a non-zero padding mode: through the module's forward
        with torch.enable_grad():
            return torch.autograd.grad(self.op(leaf), leaf, delta)[0]

    def bias_grad(self, delta: Tensor) -> Tensor:
        d = delta.movedim(1, -1) if self.kind == "conv" else delta
        return d.reshape(-1, d.shape[-1]).sum(0)

    def rows(self, tensor: Tensor) -> Tensor:
        """A Linear call's input or output as ``(rows, features)``, rows ordered sample-major."""
        return tensor.reshape(-1, tensor.shape[-1])

    def detach(self) -> "LayerCall":
        return LayerCall(self.module, self.kind, self.input.detach(), self.output.detach(), self.weight, self.bias)


Transform = Callable[[nn.Module, LayerCall], Optional[Tensor]]


@contextlib.contextmanager
def capture_calls(model: nn.Module, transform: Transform, names: Optional[Mapping[int, str]] = None
                  ) -> Iterator[List[LayerCall]]:
    """Record each call of a supported layer inside ``model`` while the context is open.

    Args:
        model: the module whose sub-modules are hooked (hooks are removed on exit).
        transform: ``transform(module, call)`` may return a replacement output (used for a low-rank weight update);
            the recorded ``call.output`` is what the layer finally returns.
        names: ``id(tensor) -> parameter name`` of the tensors substituted for the parameters (``functional_call``);
            a call whose weight is not among them is recorded with ``weight=None``.
    """
    calls: List[LayerCall] = []
    handles = []

    def hook(module, args, output):
        kind = closed_form_kind(module)
        if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(output):
            return None
        lookup = names or {}
        bias = getattr(module, "bias", None)
        call = LayerCall(module, kind, args[0], output, lookup.get(id(module.weight)),
                         None if bias is None else lookup.get(id(bias)))
        new = transform(module, call)
        if new is not None:
            call.output = new
        calls.append(call)
        return new

    for m in model.modules():
        if closed_form_kind(m) is not None:
            handles.append(m.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


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
