"""What a layer type contributes to the fast hypergradient in closed form: the :class:`LayerRule` protocol and the
registry that maps module types to rules.

A layer ``z = op(a, W) + b`` whose output is linear in its weight (``a``: an activation captured in the forward,
not necessarily the layer's input: LayerNorm captures its normalised input) gives, with ``δ_i = ∂ℓ_i/∂z_i``,

    ∇_W ℓ_i · U = ⟨δ_i, op(a_i, U)⟩        (per-sample contribution ``c_i``, *direct* form)
    Σ_i w_i ∇_W ℓ_i = op_a*(w ⊙ δ)         (the real step's gradient, replayed from the captures)

and the bias enters as ``⟨δ_i, b⟩`` (broadcast over the output). A rule says how to capture ``a``, what ``op`` is
and, where it is cheaper than autograd through ``op``, the adjoint ``op_a*`` (:meth:`LayerRule.weight_grad`).
Rules with ``gram = True`` (``Linear``) also support the *Gram* form, which needs ``a`` and ``δ`` as rows.

Rules are looked up by the module's exact type (a subclass may override ``forward``, and then the rule would not
describe it); register a rule for your own layer with :func:`register_layer_rule`. A layer class of an optional
package (Hugging Face ``transformers``) is registered *by name* instead, so nothing imports the package: by its
qualified name ``"package.module.Class"``, or by a pattern such as ``"transformers.models.*"`` for a family whose
class names vary by model. Such a rule is checked against the class's behaviour once, on the first instance seen
(:mod:`.behaviour`; once per configuration: an instance whose plain attributes or shapes differ is checked again): a
cheap pre-filter on the class (:meth:`LayerRule.describes`), then the class's forward run on small probe inputs must
give what the rule states the layer computes (:meth:`LayerRule.expected_output`), in each probe's dtype. A class that merely shares a name, or computes something else, is not matched and keeps the exact JVP
path.

Example (a user-defined layer that scales its input feature-wise):
    >>> import torch
    >>> from torch import nn
    >>> class Scale(nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(d))
    ...     def forward(self, x):
    ...         return x * self.weight
    >>> class ScaleRule(LayerRule):
    ...     kind = "scale"
    ...     def op(self, module, a, weight):
    ...         return a * weight
    >>> register_layer_rule(Scale, ScaleRule())
    >>> rule_for(Scale(3)).kind
    'scale'
"""

from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .behaviour import behaves_as_stated, configuration, forward_replaced


class LayerRule:
    """The closed form of one layer type. Subclass it and override :meth:`op` (required) and, optionally, the
    capture, the adjoint and the bias layout. Every method receives the module and the captured activation ``a``.

    Attributes:
        kind: a short name (shown in ``Fast.last_paths`` diagnostics and errors).
        gram: whether the Gram / low-rank form applies (a weight used as ``a @ Wᵀ`` over rows of features).
        broadcast: whether a call whose captured activation has batch size 1 is shared by every sample (BERT's
            ``(1, L)`` position ids) and may be expanded over the batch, so that each sample gets its own ``δ_i``.
        row_lookup: whether a call reads only the weight rows its activation indexes (a lookup table, no bias);
            such a rule implements :meth:`rows_read` and :meth:`op_on_rows`, and ``Fast`` may then form the virtual
            step and the meta gradient of the weight on the rows the meta batch reads alone.
        probe_method: (rules registered by name or pattern) the class's method the behavioural check runs on
            :meth:`probes` (``"forward"``; T5's attention: ``"compute_bias"``).
    """

    kind: str = "custom"
    gram: bool = False
    broadcast: bool = False
    row_lookup: bool = False
    composite: bool = False  # runs the module's forward itself, recording inner calls (MultiheadAttention)
    regroups: bool = False  # a call on (samples x rows, ...) may be recorded as (samples, rows, ...) (row-wise ops)
    probe_method: str = "forward"

    # ---- which modules and parameters -------------------------------------------------------------------
    def describes(self, module_type: Type[nn.Module]) -> bool:
        """(Rules registered by name or pattern) a cheap pre-filter: whether the class may be the rule's layer
        (e.g. defined in the package, a subclass of ``nn.Embedding``); the behavioural check runs only on such
        classes. Default: True."""
        return True

    def probes(self, module: nn.Module, generator: torch.Generator) -> Iterable[Tuple[nn.Module, tuple]]:
        """(Rules registered by name or pattern) the behavioural check's probes for an instance the rule applies
        to: ``(target, args)`` pairs; the check compares ``type(module).<probe_method>(target, *args)`` with
        :meth:`expected_output` ``(target, *args)``. ``target`` is the module or a :func:`.behaviour.stand_in` with
        probe parameters (random values from ``generator``, on the module's device); sized from the instance's
        shapes. Default: none, and the rule is trusted for every class :meth:`describes` accepts."""
        return ()

    def expected_output(self, module: nn.Module, *args) -> Tensor:
        """What the layer computes on ``args``, from the rule's own formulas (the behavioural check compares it
        with the class's own output: dtype, shape and values to a few ulps)."""
        raise NotImplementedError(f"{type(self).__name__} has probes and must implement expected_output")

    def applies(self, module: nn.Module) -> bool:
        """Whether this module instance is described by the rule (e.g. not an Embedding with ``max_norm``)."""
        return True

    def weight(self, module: nn.Module) -> Optional[Tensor]:
        return getattr(module, "weight", None)

    def bias(self, module: nn.Module) -> Optional[Tensor]:
        return getattr(module, "bias", None)

    # ---- the forward ------------------------------------------------------------------------------------
    def capture(self, module: nn.Module, args: Sequence, output: Tensor) -> Optional[Tensor]:
        """The activation ``a`` the closed forms need (default: the first positional input), or None to skip."""
        return args[0] if args and torch.is_tensor(args[0]) else None

    def batched(self, module: nn.Module, a: Tensor) -> bool:
        """Whether dim 0 of ``a`` indexes samples (an unbatched call cannot be attributed per sample)."""
        return a.dim() >= 2

    def op(self, module: nn.Module, a: Tensor, weight: Tensor) -> Tensor:
        """The layer's output for weight ``weight`` without bias: linear in ``weight``, shaped like the output."""
        raise NotImplementedError(f"{type(self).__name__} must implement op(module, a, weight)")

    def bias_view(self, module: nn.Module, u: Tensor, like: Tensor) -> Tensor:
        """``u`` (shaped like the bias) laid out to broadcast against the output ``like`` (default: trailing dims)."""
        return u

    def mask(self, module: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
        """Output gradients with the entries autograd gives no weight gradient zeroed (Embedding's padding row)."""
        return delta

    def rows_read(self, module: nn.Module, a: Tensor) -> Tensor:
        """(``row_lookup`` rules) the indices of the weight rows a call with activation ``a`` reads (any order,
        repeats allowed)."""
        raise NotImplementedError(f"{type(self).__name__} sets row_lookup and must implement rows_read")

    def op_on_rows(self, module: nn.Module, a: Tensor, rows: Tensor, weight_rows: Tensor) -> Tensor:
        """(``row_lookup`` rules) :meth:`op` for the weight whose rows ``rows`` (sorted, unique) are ``weight_rows``
        and whose other rows are zero; differentiable in ``weight_rows`` as :meth:`op` is in the weight."""
        raise NotImplementedError(f"{type(self).__name__} sets row_lookup and must implement op_on_rows")

    # ---- the closed forms -------------------------------------------------------------------------------
    def per_sample_dot(self, module: nn.Module, a: Tensor, delta: Tensor, out: Tensor) -> Tensor:
        """``(B,)``: ``⟨δ_i, out_i⟩`` summed over every non-batch dimension. (A batched dot, ``bmm``, avoids the
        product tensor but measured 3× slower on transformer shapes, (16, 64, 1536), and 2× faster only on
        16 MB conv outputs; the plain product is kept.)"""
        return (self.mask(module, a, delta) * out).reshape(a.shape[0], -1).sum(1)

    def bias_dot(self, module: nn.Module, a: Tensor, delta: Tensor, u: Tensor) -> Tensor:
        """``(B,)``: ``∇_b ℓ_i · u``."""
        return (delta * self.bias_view(module, u, delta)).reshape(a.shape[0], -1).sum(1)

    def weight_grad(self, module: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
        """``Σ_i ∇_W ℓ_i`` for output gradients ``delta`` (already weighted per sample). Default: autograd
        through :meth:`op` (override with the explicit adjoint where it saves the forward)."""
        w = self.weight(module)
        leaf = torch.zeros(w.shape, dtype=delta.dtype, device=delta.device, requires_grad=True)
        with torch.enable_grad():
            return torch.autograd.grad(self.op(module, a.to(delta.dtype), leaf), leaf, self.mask(module, a, delta))[0]

    def bias_grad(self, module: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
        """``Σ_i ∇_b ℓ_i`` for output gradients ``delta``: ``delta`` summed onto the bias's layout."""
        b = self.bias(module)
        view = self.bias_view(module, torch.ones(b.shape, dtype=delta.dtype, device=delta.device), delta)
        dims = [d for d in range(delta.dim()) if d < delta.dim() - view.dim() or view.shape[d - delta.dim()] == 1]
        return delta.sum(dims).reshape(b.shape)

    def rows(self, module: nn.Module, tensor: Tensor) -> Tensor:
        """(Gram rules) ``tensor`` as ``(rows, features)``, rows ordered sample-major."""
        return tensor.reshape(-1, tensor.shape[-1])


_RULES: Dict[Type[nn.Module], LayerRule] = {}  # by exact type
_NAMED: Dict[str, LayerRule] = {}  # by qualified name, "package.module.Class"
_PATTERNS: List[Tuple[str, LayerRule]] = []  # by fnmatch pattern over the qualified name, newest first
_CANDIDATES: Dict[type, List[LayerRule]] = {}  # the rules registered by name/pattern that describe a class
_RESOLVED: Dict[Tuple[type, tuple], Optional[LayerRule]] = {}  # decided, per class and configuration
_VERDICTS: Dict[Tuple[type, tuple, LayerRule], bool] = {}  # each behavioural check, once


def qualified_name(module_type: type) -> str:
    """``"package.module.Class"``: the key of a rule registered by name.

    Example:
        >>> qualified_name(nn.Linear)
        'torch.nn.modules.linear.Linear'
    """
    return f"{module_type.__module__}.{module_type.__qualname__}"


def register_layer_rule(module_type: Union[Type[nn.Module], str], rule: LayerRule) -> None:
    """Use ``rule`` for every module of exactly ``module_type`` (replacing a built-in or earlier rule).

    ``module_type`` may also be a class's qualified name (``"transformers.pytorch_utils.Conv1D"``), which registers
    the rule without importing the class's package, or a pattern over qualified names (``"transformers.models.*"``;
    several rules may share a pattern, each stating its own layer's output), tried newest first. A rule registered by
    name or pattern is used for a class only where :meth:`LayerRule.describes` accepts it and the class's forward,
    run once on the probes of :meth:`LayerRule.probes`, gives :meth:`LayerRule.expected_output`
    (:mod:`.behaviour`); one registered for the type itself takes precedence and is not checked.

    The rule is trusted: a wrong ``op`` gives a wrong hypergradient, though the first call on a model checks the
    attribution against autograd (``Fast(verify=True)``) and falls back to the exact JVP path on a mismatch.

    Example (by name; two classes called ``my_layers.Double``, one computing what the rule states):
        >>> class DoubleRule(LayerRule):
        ...     kind = "double"
        ...     def op(self, module, a, weight):
        ...         return 2 * a * weight
        ...     def probes(self, module, generator):
        ...         return [(module, (torch.randn(2, 3, generator=generator),))]
        ...     def expected_output(self, module, x):
        ...         return self.op(module, x, module.weight)
        >>> register_layer_rule("my_layers.Double", DoubleRule())
        >>> def double(forward):
        ...     cls = type("Double", (nn.Module,), {"forward": forward, "__module__": "my_layers"})
        ...     module = cls()
        ...     module.weight = nn.Parameter(torch.ones(3))
        ...     return module
        >>> rule_for(double(lambda self, x: self.weight * (x + x))).kind, rule_for(double(lambda self, x: x))
        ('double', None)
    """
    if not isinstance(rule, LayerRule):
        raise TypeError(f"register_layer_rule needs a LayerRule instance (e.g. MyRule(), not MyRule), got {rule!r}")
    if isinstance(module_type, str):
        if "." not in module_type or not module_type.replace("*", "").replace("?", "").strip("."):
            raise TypeError(f"register_layer_rule needs an nn.Module subclass, or by name a qualified class name "
                            f"such as 'package.module.Class' or a pattern such as 'package.*', got {module_type!r}")
        if any(c in module_type for c in "*?["):
            _PATTERNS.insert(0, (module_type, rule))
        else:
            _NAMED[module_type] = rule
        for cache in (_CANDIDATES, _RESOLVED, _VERDICTS):
            cache.clear()
        return
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer_rule needs an nn.Module subclass or a qualified class name, "
                        f"got {module_type!r}")
    _RULES[module_type] = rule


def _candidates(module_type: type) -> List[LayerRule]:
    """The rules registered for the class's name, then those of its matching patterns (newest first), that
    :meth:`LayerRule.describes` accepts (once per class)."""
    try:
        return _CANDIDATES[module_type]
    except KeyError:
        pass
    name = qualified_name(module_type)
    rules = [_NAMED[name]] if name in _NAMED else []
    rules += [rule for pattern, rule in _PATTERNS if fnmatch.fnmatchcase(name, pattern)]
    rules = _CANDIDATES[module_type] = [rule for rule in rules if rule.describes(module_type)]
    return rules


def _verdict(rule: LayerRule, module: nn.Module, key: tuple) -> Optional[bool]:
    """Whether the module's class, in the module's configuration, is the rule's layer (checked once); None if this
    instance cannot tell (its forward replaced, its tensors on the meta device)."""
    if (*key, rule) not in _VERDICTS:
        if rule.applies(module):
            verdict = behaves_as_stated(rule, module)
        else:
            verdict = None if forward_replaced(module) else False
        if verdict is None:
            return None
        _VERDICTS[(*key, rule)] = verdict
    return _VERDICTS[(*key, rule)]


def _resolve(module: nn.Module, candidates: List[LayerRule], key: tuple) -> Tuple[Optional[LayerRule], bool]:
    """The first candidate rule whose behavioural check the module passes, and whether that is decided for its
    class and configuration (not where an earlier candidate could not tell on this instance)."""
    decided = True
    for rule in candidates:
        verdict = _verdict(rule, module, key)
        if verdict:
            return rule, decided
        decided = decided and verdict is not None
    return None, decided


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The rule for ``module``'s exact type, if it applies to this instance: registered for the type (a dict
    lookup), else by name or pattern, decided once per class and :func:`.behaviour.configuration` (the instance's
    plain attributes and shapes) by the behavioural check, then looked up by both."""
    cls = type(module)
    rule = _RULES.get(cls)
    if rule is None:
        candidates = _candidates(cls)
        if not candidates:
            return None
        key = (cls, configuration(module))
        try:
            rule = _RESOLVED[key]
        except KeyError:
            rule, decided = _resolve(module, candidates, key)
            if decided:
                _RESOLVED[key] = rule
    return rule if rule is not None and rule.applies(module) else None


def row_positions(rows: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Where each of ``ids`` sits in the sorted unique ``rows`` (clamped into range), and whether it is there: the
    remapping of lookups into a table gathered on ``rows`` (``row_lookup`` rules).

    Example:
        >>> pos, hit = row_positions(torch.tensor([2, 5]), torch.tensor([5, 1, 2]))
        >>> pos.tolist(), hit.tolist()
        ([1, 0, 0], [True, False, True])
    """
    pos = torch.searchsorted(rows, ids).clamp_(max=rows.numel() - 1)
    return pos, rows[pos] == ids
