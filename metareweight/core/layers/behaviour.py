"""Whether a layer class computes what a rule says it computes: a behavioural check on small probe inputs.

A rule registered by name or pattern (:func:`~metareweight.core.layers.base.register_layer_rule`) may state its
layer's output in its own terms (:meth:`LayerRule.expected_output`) and the inputs to try it on
(:meth:`LayerRule.probes`). Once per class and :func:`configuration` (an instance's plain attributes and shapes),
:func:`behaves_as_stated` then runs the *class's* method (``type(module).forward``: no hook fires, and a forward
replaced on an instance is never what is judged) on each probe, under
``torch.no_grad()`` with autocast off, and compares the output with the rule's: the same dtype and shape, and the
same values to a few units in the last place. A probe runs on a :func:`stand_in` of the module (the same class and
attributes, its parameters swapped for probe tensors or detached views), on the module's device, with probe tensors
drawn from a local generator: the module, its parameters and buffers, its hooks and the global random state are left
untouched. A forward that raises, or an output that differs, refuses the class; a module on the ``meta`` device
cannot be judged (no values), and the check is left for a later instance. The comparison is strict on purpose: forms
that differ only in where they cast (Hugging Face's RMSNorms) differ in an output's dtype or in its low bits, and the
check must tell them apart; a class computing the same formula with other roundings (``x / sqrt(v)`` for
``x * rsqrt(v)``) is refused too, and keeps the exact JVP path.

Example (a rule for a layer that doubles its input, and two classes claiming to be it):
    >>> import torch
    >>> from torch import nn
    >>> class Twice(nn.Module):
    ...     def forward(self, x):
    ...         return x + x
    >>> class Square(nn.Module):
    ...     def forward(self, x):
    ...         return x * x
    >>> class TwiceRule:
    ...     probe_method = "forward"
    ...     def probes(self, module, generator):
    ...         return [(module, (torch.randn(2, 3, generator=generator),))]
    ...     def expected_output(self, module, x):
    ...         return 2 * x
    >>> behaves_as_stated(TwiceRule(), Twice()), behaves_as_stated(TwiceRule(), Square())
    (True, False)
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import Tensor, nn

#: how far (in units in the last place of the output's largest entry) a probe's output may be from the rule's
ULPS = 4


def forward_replaced(module: nn.Module) -> bool:
    """Whether this instance's ``forward`` was replaced (not its class's: a kernel, an offloading hook)."""
    return "forward" in module.__dict__


def in_package(module_type: type, package: str) -> bool:
    """Whether the class is defined in ``package`` or one of its sub-modules.

    Example:
        >>> in_package(nn.Linear, "torch.nn"), in_package(nn.Linear, "torch.n")
        (True, False)
    """
    mod = module_type.__module__ or ""
    return mod == package or mod.startswith(package + ".")


def takes_one_input(method) -> bool:
    """Whether ``method(self, x)`` takes exactly one input besides ``self`` (a forward with more, a norm's ``gate``
    say, may compute something else with them than its probe shows).

    Example:
        >>> takes_one_input(nn.Linear.forward), takes_one_input(nn.MultiheadAttention.forward)
        (True, False)
    """
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 2 and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)


def own_parameters(module: nn.Module) -> set:
    """The names of the module's own parameters (not its sub-modules'): a layer with a parameter the rule does not
    know of computes something with it that the rule does not describe."""
    return {name for name, p in module._parameters.items() if p is not None}


def configuration(module: nn.Module) -> tuple:
    """What may make two instances of a class behave differently, beyond their parameter values: their plain
    attributes (numbers, strings, flags: ``eps``, ``with_scale``, ``group_size``, ...) and their own parameters'
    and buffers' shapes. The behavioural check runs once per class and configuration.

    Example:
        >>> configuration(nn.LayerNorm(3))
        (('elementwise_affine', True), ('eps', 1e-05), ('normalized_shape', (3,)), ('bias', (3,)), ('weight', (3,)))
    """
    plain = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and k != "training" and _is_plain(v)))
    shapes = tuple(sorted((k, tuple(t.shape)) for store in (module._parameters, module._buffers)
                          for k, t in store.items() if t is not None))
    return plain + shapes


def _is_plain(value) -> bool:
    if isinstance(value, tuple):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def stand_in(module: nn.Module, **replace) -> nn.Module:
    """An object of ``module``'s class with its attributes, on which a probe runs instead of the module: the
    parameters and buffers named in ``replace`` (tensors) and sub-modules (modules) swapped for the given ones, the
    others detached views (no copy), and no hooks of its own. ``module`` itself is not changed.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> twin = stand_in(lin, bias=torch.zeros(2))
        >>> twin.bias.tolist(), lin.bias is not twin.bias, twin.weight.data_ptr() == lin.weight.data_ptr()
        ([0.0, 0.0], True, True)
    """
    twin = object.__new__(type(module))
    state = dict(module.__dict__)
    for key, value in state.items():
        if "hooks" in key and isinstance(value, dict):
            state[key] = type(value)()
    state["_parameters"] = {k: None if v is None else v.detach() for k, v in module._parameters.items()}
    state["_buffers"] = {k: None if v is None else v.detach() for k, v in module._buffers.items()}
    state["_modules"] = dict(module._modules)
    for name, value in replace.items():
        store = "_modules" if isinstance(value, nn.Module) else "_buffers" if name in module._buffers \
            else "_parameters"
        state[store][name] = value
    state.pop("forward", None)  # an instance's replaced forward is not the class's
    twin.__dict__.update(state)
    return twin


def probe_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU if it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def same_output(out, expected: Tensor, ulps: int = ULPS) -> bool:
    """Whether ``out`` is ``expected``: a tensor of the same dtype and shape, equal to ``ulps`` units in the last
    place of ``expected``'s largest entry (exactly, for integers).

    Example:
        >>> x = torch.tensor([1.0, 2.0])
        >>> same_output(x + 1e-7, x), same_output(x + 1e-3, x), same_output(x.double(), x)
        (True, False, False)
    """
    if not torch.is_tensor(out) or out.dtype != expected.dtype or out.shape != expected.shape:
        return False
    if torch.equal(out, expected):
        return True
    if not expected.is_floating_point():
        return False
    tol = ulps * torch.finfo(expected.dtype).eps
    work = torch.promote_types(expected.dtype, torch.float32)
    out, expected = out.to(work), expected.to(work)
    return bool(((out - expected).abs() <= tol * expected.abs().amax()).all())


@contextlib.contextmanager
def _quiet(device: torch.device):
    """No autograd, no autocast on ``device``, and the global random state restored afterwards."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        try:
            stack.enter_context(torch.autocast(device.type, enabled=False))
        except (RuntimeError, ValueError):  # a device type without autocast
            pass
        yield


def behaves_as_stated(rule, module: nn.Module) -> Optional[bool]:
    """Whether ``module``'s class computes what ``rule`` states (:meth:`LayerRule.expected_output`) on every probe
    of :meth:`LayerRule.probes`: True, False (an output differs, or the class's method raises), or None where this
    instance cannot tell (its tensors on the ``meta`` device). A rule with no probes is trusted (True)."""
    device = probe_device(module)
    if device.type == "meta" or any(t.is_meta for t in module.buffers()):
        return None
    method = getattr(type(module), rule.probe_method, None)
    if not callable(method):
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        with _quiet(device):
            for target, args in rule.probes(module, generator):
                if not same_output(method(target, *args), rule.expected_output(target, *args)):
                    return False
    except Exception:  # noqa: BLE001 - whatever the class does with the probe, it is not the rule's layer
        return False
    return True


def probe_tensor(generator: torch.Generator, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Standard normal values drawn from ``generator`` (on the CPU), as ``dtype`` on ``device``."""
    drawn = dtype if dtype in (torch.float64, torch.float32) else torch.float32
    return torch.randn(shape, generator=generator, dtype=drawn).to(device=device, dtype=dtype)


def random_parameter_probes(module: nn.Module, generator: torch.Generator, width: int):
    """Probes for a layer on inputs of shape ``(2, 3, width)``: in float64, then float32, a stand-in whose own
    parameters (in the order registered) are random tensors of their shapes, and one such input.

    Example:
        >>> [(twin.weight.dtype, x.shape) for twin, (x,) in random_parameter_probes(
        ...     nn.Linear(4, 2), torch.Generator().manual_seed(0), 4)]
        [(torch.float64, torch.Size([2, 3, 4])), (torch.float32, torch.Size([2, 3, 4]))]
    """
    device = probe_device(module)
    names = [name for name, p in module._parameters.items() if p is not None]
    for dtype in (torch.float64, torch.float32):
        params = {name: probe_tensor(generator, getattr(module, name).shape, dtype, device) for name in names}
        yield stand_in(module, **params), (probe_tensor(generator, (2, 3, width), dtype, device),)
