"""Mixed precision for the inner, meta and real steps: bf16 autocast (CPU and GPU), fp16 autocast with loss scaling
(GPU only).

Parameters, optimizer state and meta-parameters stay float32, and only the *model's* forward passes run under
autocast (:meth:`Precision.wrap`); the objective's losses, weight net and normaliser and the functional optimizer
run in float32 on the model's outputs cast back to float32. A hypergradient is a sum of per-sample terms of both
signs, and running the weight net in bf16 too cost 2-9 % relative error on the test problems, against 0.3-0.9 %
with the model alone in bf16 (``tests/test_precision.py``: relative L2 error of the unrolled hypergradient against
float32, tolerance ``2e-2``; float32 itself is within 3e-6 of float64). Use fp16 only on a GPU: its narrow
exponent needs a ``GradScaler``.

fp16 scaling covers the real step (the usual ``scale → backward → unscale → clip → step``) and the meta step
(the outer loss is multiplied by the meta scaler's scale, so every term of the hypergradient is scaled, and the
meta scaler unscales and skips steps with inf/NaN). The virtual step's own gradient is *not* scaled: scaling it
would change θ'. If fp16 underflows there, use bf16.

Example:
    >>> import torch
    >>> p = Precision("bf16", torch.device("cpu"))
    >>> with p.autocast():
    ...     y = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    >>> y.dtype, p.scaler is None
    (torch.bfloat16, True)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict, Optional, Sequence

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _to_float32(out: Any) -> Any:
    if torch.is_tensor(out):
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out


class Precision:
    """Autocast and (for fp16) gradient scalers for one trainer.

    Args:
        mode: ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (CUDA only).
        device: the model's device.
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {mode!r}")
        device = torch.device(device)
        if mode == "fp16" and device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device (fp16 on CPU is slow and needs loss scaling); "
                             "use precision='bf16' on CPU")
        self.mode = mode
        self.device_type = device.type
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.meta_scaler: Optional[torch.amp.GradScaler] = None
        if mode == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")
            self.meta_scaler = torch.amp.GradScaler("cuda")

    def autocast(self) -> ContextManager:
        """The autocast context for forward passes (a no-op for fp32)."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.mode])

    def wrap(self, forward: Callable) -> Callable:
        """``forward`` run under autocast with floating outputs cast back to float32.

        Only the model runs in low precision: the objective's losses, weight net, normaliser and the functional
        optimizer see float32, which keeps the hypergradient's cancellations (a sum of per-sample terms of both
        signs) out of bf16.
        """
        if self.mode == "fp32":
            return forward

        def low_precision_forward(*args, **kwargs):
            with self.autocast():
                out = forward(*args, **kwargs)
            return _to_float32(out)

        return low_precision_forward

    def wrap_fn(self, fn: Callable) -> Callable:
        """An objective function ``fn(forward, batch)`` whose ``forward`` runs under :meth:`wrap`."""
        if self.mode == "fp32":
            return fn

        def wrapped(forward, batch):
            return fn(self.wrap(forward), batch)

        return wrapped

    # ---- real step ------------------------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    # ---- meta step ------------------------------------------------------------------------------------------
    def meta_scale(self) -> float:
        """The factor the outer loss is multiplied by (1 unless fp16)."""
        return 1.0 if self.meta_scaler is None else float(self.meta_scaler.get_scale())

    def scale_outer(self, outer_fn):
        """Wrap an outer-loss function so its value (hence the hypergradient) is multiplied by the meta scale."""
        if self.meta_scaler is None:
            return outer_fn
        scaler = self.meta_scaler

        def scaled(forward, batch):
            return scaler.scale(outer_fn(forward, batch))

        return scaled

    # ---- both -------------------------------------------------------------------------------------------------
    @staticmethod
    def step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], scaler: Optional[torch.amp.GradScaler],
             clip: Optional[float]) -> Optional[float]:
        """Unscale (fp16), clip to ``clip`` total norm, step and update the scale. Returns the pre-clip norm."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = None
        if clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(list(params), clip))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return norm

    def state_dict(self) -> Dict[str, Any]:
        return {"scaler": None if self.scaler is None else self.scaler.state_dict(),
                "meta_scaler": None if self.meta_scaler is None else self.meta_scaler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name in ("scaler", "meta_scaler"):
            mine = getattr(self, name)
            if (mine is None) != (state.get(name) is None):
                raise ValueError(f"the checkpoint's {name} does not match precision={self.mode!r}; resume with the "
                                 "precision the run was started with")
            if mine is not None:
                mine.load_state_dict(state[name])
