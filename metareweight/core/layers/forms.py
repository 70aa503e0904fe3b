"""Whether a layer class computes what a rule assumes: its methods compile to the same code as reference functions.

A rule for a family of classes it cannot import (Hugging Face defines a copy of its RMSNorm per model,
``LlamaRMSNorm``, ``Qwen2RMSNorm``, ...) checks each class once: same base classes, and each listed method of the
class compiles to the same operations on the same names, constants and local variables as the rule's reference
function (comments, docstrings, annotations and line numbers do not count). A class whose forward differs in any
operation, or a later library version that changes it, is not matched and keeps the exact JVP path. Instances whose
``forward`` was replaced (``module.forward = ...``: kernels, offloading hooks) are refused by :func:`forward_replaced`.

Example:
    >>> from torch import nn
    >>> class Twice(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x  # a comment
    >>> def reference(self, x):
    ...     return 2 * x
    >>> def other(self, x):
    ...     return x * 2
    >>> has_form(Twice, (nn.Module,), forward=reference), has_form(Twice, (nn.Module,), forward=other)
    (True, False)
"""

from __future__ import annotations

import dis
import types
from typing import Callable, Tuple

from torch import nn


def _instructions(code: types.CodeType) -> tuple:
    """The code's instructions as ``(operation, resolved argument)``: constant and name indices resolved (a
    docstring shifts them), nested code compared the same way, line numbers left out."""
    return tuple((i.opname, _instructions(i.argval) if isinstance(i.argval, types.CodeType) else i.argval)
                 for i in dis.get_instructions(code))


def same_code(fn: Callable, reference: Callable) -> bool:
    """Whether two functions compile to the same operations on the same names and constants (docstrings, comments,
    annotations and line numbers aside)."""
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType):
        return False
    a, b = fn.__code__, reference.__code__
    return (a.co_argcount, a.co_kwonlyargcount, a.co_varnames, a.co_freevars) == \
        (b.co_argcount, b.co_kwonlyargcount, b.co_varnames, b.co_freevars) and _instructions(a) == _instructions(b)


def has_form(module_type: type, bases: Tuple[type, ...], **methods: Callable) -> bool:
    """Whether ``module_type`` has exactly the base classes ``bases`` and each named method (as resolved on the
    class) compiles to the same code as the reference given for it."""
    if module_type.__bases__ != bases:
        return False
    return all(same_code(getattr(module_type, name, None), ref) for name, ref in methods.items())


def forward_replaced(module: nn.Module) -> bool:
    """Whether this instance's ``forward`` was replaced (not its class's)."""
    return "forward" in module.__dict__


def in_package(module_type: type, package: str) -> bool:
    """Whether the class is defined in ``package`` or one of its sub-modules."""
    mod = module_type.__module__ or ""
    return mod == package or mod.startswith(package + ".")
