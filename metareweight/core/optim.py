"""Differentiable copies of ``torch.optim`` update rules.

A :class:`FunctionalOptimizer` reads the hyper-parameters and state of a user's own ``torch.optim`` optimizer and
applies the same update to a dict of tensors, so that a virtual step ``θ' = step(θ, ∇L_in)`` can be differentiated
with respect to the meta-parameters that shaped ``∇L_in``. The arithmetic follows ``torch.optim.SGD``/``Adam``/
``AdamW`` line by line; ``tests/test_optim.py`` checks that ``k`` functional steps equal ``k`` real ones.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    >>> fopt = FunctionalOptimizer.from_torch(opt, lin)
    >>> params = {k: v.detach() for k, v in lin.named_parameters()}
    >>> grads = {k: torch.ones_like(v) for k, v in params.items()}
    >>> new, state = fopt.step(params, grads, fopt.read_state())
    >>> round(float(new["bias"] - params["bias"]), 6)
    -0.1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

State = Dict[str, Dict[str, Tensor]]

SUPPORTED = ("SGD", "Adam", "AdamW")
PRECONDITIONER_MODES = ("differentiable", "fixed")
NONLINEAR_STEP = ("Adam's step is not linear in the gradient; a linearised (fast / finite-difference) hypergradient "
                  "needs its preconditioner held fixed: MetaTrainer(adam_preconditioner='fixed'), or "
                  "FunctionalOptimizer(..., preconditioner='fixed') outside a trainer")


@dataclass(frozen=True)
class _Hyper:
    """The hyper-parameters of one parameter group, as plain numbers."""

    kind: str  # "sgd" or "adam"
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    decoupled: bool = False


def _hyper_from_group(optimizer: torch.optim.Optimizer, group: Mapping) -> _Hyper:
    name = type(optimizer).__name__
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        return _Hyper("sgd", lr, float(group["weight_decay"]), float(group["momentum"]),
                      float(group["dampening"]), bool(group["nesterov"]), bool(group.get("maximize", False)))
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        b1, b2 = group["betas"]
        return _Hyper("adam", lr, float(group["weight_decay"]), maximize=bool(group.get("maximize", False)),
                      beta1=float(b1), beta2=float(b2), eps=float(group["eps"]), amsgrad=bool(group["amsgrad"]),
                      decoupled=decoupled)
    raise TypeError(
        f"metareweight cannot differentiate through {name}: supported optimizers are {', '.join(SUPPORTED)} "
        "(torch.optim). Use one of them for the model, or a first-order hypergradient that never unrolls the step."
    )


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` with a zero (not NaN) derivative where ``v == 0`` (a parameter whose gradient is exactly zero,
    e.g. behind a dead ReLU): same values as ``v.sqrt()``."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


class FunctionalOptimizer:
    """The update rule of a ``torch.optim`` optimizer, applied functionally to named tensors.

    The hyper-parameters (``lr``, momentum, betas, eps, weight decay, nesterov, ...) are read from the torch
    optimizer's ``param_groups`` at every :meth:`step` and every :attr:`hypers` access, never copied: a learning
    rate changed by hand, by a warm-up callback or by a scheduler stepped anywhere is the one the next virtual
    step uses. The set of parameters is fixed when it is built: a parameter group added to the optimizer later
    (``add_param_group``) needs a new mirror.

    Args:
        mirrored: the names of the parameters to mirror (a mapping's keys are used; ``None``: every name in
            ``names``). Parameters outside it, or with ``requires_grad=False`` at the time of a step, are frozen.
        optimizer: the torch optimizer it mirrors (hyper-parameters, state).
        names: parameter name for each tensor the optimizer owns, keyed by ``id(tensor)``.
        preconditioner: ``"differentiable"`` differentiates Adam's moment estimates; ``"fixed"`` treats Adam's
            denominator ``sqrt(v̂)+eps`` as a constant (SAMA's adaptation; exact for the fast method).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> fopt = FunctionalOptimizer.from_torch(opt, lin)
        >>> opt.param_groups[0]["lr"] = 0.5  # e.g. a warm-up schedule
        >>> fopt.hypers["bias"].lr
        0.5
    """

    def __init__(self, mirrored: Optional[Iterable[str]], optimizer: torch.optim.Optimizer, names: Dict[int, str],
                 preconditioner: str = "differentiable"):
        if preconditioner not in PRECONDITIONER_MODES:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONER_MODES}, got {preconditioner!r}")
        self.optimizer = optimizer
        # the parameters themselves, not their ids: a deep copy of a trainer (model, optimizer and this together)
        # then maps them to the copies, where ids would point at the originals
        self._params = {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]
                        if id(p) in names}
        self._mirrored = None if mirrored is None else frozenset(mirrored)
        self.preconditioner = preconditioner
        for group in optimizer.param_groups:  # an unsupported optimizer is named now, not at the first step
            _hyper_from_group(optimizer, group)
        if not self.hypers:
            raise ValueError("the optimizer has no trainable parameter of the model")

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, model: nn.Module,
                   preconditioner: str = "differentiable") -> "FunctionalOptimizer":
        """Mirror ``optimizer``, whose parameters must belong to ``model``."""
        by_id = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError("the optimizer holds a parameter that is not in the model passed to MetaTrainer; "
                                     "build the optimizer from model.parameters()")
        return cls(None, optimizer, by_id, preconditioner)

    @property
    def _names(self) -> Dict[int, str]:
        """Parameter name by ``id(tensor)`` for the tensors the optimizer owns (cached; a copy rebuilds it)."""
        names = self.__dict__.get("_names_cache")
        if names is None:
            names = self._names_cache = {id(p): n for n, p in self._params.items()}
        return names

    def __getstate__(self):  # copies and pickles hold other tensors: their ids must be re-read
        state = dict(self.__dict__)
        state.pop("_names_cache", None)
        return state

    @property
    def hypers(self) -> Dict[str, _Hyper]:
        """The current hyper-parameters of every trainable mirrored parameter, by name, read from the torch
        optimizer's ``param_groups`` now (a fresh dict each access: bind it once in a loop over parameters)."""
        out: Dict[str, _Hyper] = {}
        names = self._names
        for group in self.optimizer.param_groups:
            h = None
            for p in group["params"]:
                name = names.get(id(p))
                if name is None or not p.requires_grad or (self._mirrored is not None and name not in self._mirrored):
                    continue
                if h is None:
                    h = _hyper_from_group(self.optimizer, group)
                    if h.maximize:
                        raise ValueError("maximize=True optimizers are not supported for the inner problem (it "
                                         "minimises); build the model's optimizer with maximize=False")
                out[name] = h
        return out

    @property
    def param_names(self):
        return list(self.hypers)

    # ---- state exchange with the torch optimizer -------------------------------------------------------------
    def read_state(self) -> State:
        """The torch optimizer's state, detached and keyed by parameter name. No copy is made: nothing in the
        functional path modifies state in place (steps build new tensors), and a meta step consumes it before the
        real step updates the torch optimizer's buffers."""
        out: State = {}
        names = self._names
        for p, st in self.optimizer.state.items():
            name = names.get(id(p))
            if name is None:
                continue
            out[name] = {k: (v.detach() if torch.is_tensor(v) else torch.tensor(float(v)))
                         for k, v in st.items() if v is not None}
        return out

    def write_state(self, state: State, model: nn.Module) -> None:
        """Write ``state`` back into the torch optimizer (used when a virtual step becomes the real step)."""
        params = dict(model.named_parameters())
        for name, st in state.items():
            p = params[name]
            target = self.optimizer.state[p]
            for k, v in st.items():
                v = v.detach()
                if k == "step":
                    target[k] = v.clone().to(torch.float32)
                else:
                    target[k] = v.clone()

    # ---- the update itself -----------------------------------------------------------------------------------
    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Optional[Tensor]], state: State):
        """One update. Returns ``(new_params, new_state)``; inputs are not modified.

        Gradients may be ``None`` (parameter unused by the loss): torch.optim skips such parameters, and so does this.
        """
        new_params = dict(params)
        new_state: State = {k: dict(v) for k, v in state.items()}
        for name, h in self.hypers.items():  # read now: the optimizer's current hyper-parameters
            g = grads.get(name)
            if g is None:
                continue
            p = params[name]
            st = new_state.setdefault(name, {})
            new_params[name] = self._sgd(p, g, st, h) if h.kind == "sgd" else self._adam(p, g, st, h)
        return new_params, new_state

    @staticmethod
    def _sgd(p: Tensor, g: Tensor, st: Dict[str, Tensor], h: _Hyper) -> Tensor:
        if h.weight_decay:
            g = g + h.weight_decay * p
        if h.momentum:
            buf = st.get("momentum_buffer")
            buf = g if buf is None else h.momentum * buf + (1 - h.dampening) * g
            st["momentum_buffer"] = buf
            g = g + h.momentum * buf if h.nesterov else buf
        return p - h.lr * g

    def _adam(self, p: Tensor, g: Tensor, st: Dict[str, Tensor], h: _Hyper) -> Tensor:
        step = st.get("step", torch.tensor(0.0)) + 1
        st["step"] = step
        t = float(step)
        if h.weight_decay:
            if h.decoupled:
                p = p * (1 - h.lr * h.weight_decay)
            else:
                g = g + h.weight_decay * p
        m = st.get("exp_avg", torch.zeros_like(p))
        v = st.get("exp_avg_sq", torch.zeros_like(p))
        m = h.beta1 * m + (1 - h.beta1) * g
        g_sq = g.detach() if self.preconditioner == "fixed" else g
        v = h.beta2 * v + (1 - h.beta2) * g_sq * g_sq
        st["exp_avg"], st["exp_avg_sq"] = m, v
        if h.amsgrad:
            v = torch.maximum(st.get("max_exp_avg_sq", torch.zeros_like(p)), v)
            st["max_exp_avg_sq"] = v
        bc1 = 1 - h.beta1 ** t
        bc2 = 1 - h.beta2 ** t
        denom = _safe_sqrt(v) / (bc2 ** 0.5) + h.eps
        if self.preconditioner == "fixed":
            denom = denom.detach()
        return p - (h.lr / bc1) * m / denom

    # ---- linearisation used by first-order and fast methods -------------------------------------------------
    @property
    def steps_linearly(self) -> bool:
        """Whether a step is linear in the loss gradient (false only for Adam with the differentiable preconditioner)."""
        return self.preconditioner == "fixed" or all(h.kind != "adam" for h in self.hypers.values())

    def linear_scale(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: State) -> Dict[str, Tensor]:
        """The diagonal ``P`` with ``∂θ'/∂g = −P`` for one step from ``state`` with loss gradient ``grads``.

        Exact for the SGD family (momentum, dampening, nesterov, weight decay) and for Adam/AdamW with a fixed
        preconditioner. Raises for Adam with ``preconditioner="differentiable"``, where the step is not linear in g.
        """
        out: Dict[str, Tensor] = {}
        for name, h in self.hypers.items():
            if grads.get(name) is None:
                continue
            st = state.get(name, {})
            if h.kind == "sgd":
                f = 1.0
                if h.momentum:
                    f = 1.0 if "momentum_buffer" not in st else 1 - h.dampening
                    if h.nesterov:
                        f = f * (1 + h.momentum)
                out[name] = torch.as_tensor(h.lr * f, dtype=params[name].dtype, device=params[name].device)
                continue
            if self.preconditioner != "fixed":
                raise ValueError(NONLINEAR_STEP)
            t = float(st.get("step", torch.tensor(0.0))) + 1
            g = grads[name].detach()
            if h.weight_decay and not h.decoupled:
                g = g + h.weight_decay * params[name].detach()
            v = h.beta2 * st.get("exp_avg_sq", torch.zeros_like(g)) + (1 - h.beta2) * g * g
            if h.amsgrad:
                v = torch.maximum(st.get("max_exp_avg_sq", torch.zeros_like(g)), v)
            denom = v.sqrt() / ((1 - h.beta2 ** t) ** 0.5) + h.eps
            out[name] = (h.lr / (1 - h.beta1 ** t)) * (1 - h.beta1) / denom
        return out
