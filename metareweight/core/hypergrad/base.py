"""The one signature every hypergradient method shares, and the registry that selects them by name.

**A new method** goes in its own file in ``metareweight/core/hypergrad/``: a dataclass subclass of
:class:`HypergradMethod` with its own ``name``, imported in ``hypergrad/__init__.py`` (which registers it), exported
in ``metareweight/__init__.py``, and tested against a float64 finite difference of the bilevel objective and the
other exact methods (``tests/test_<method>.py``). It sees only the :class:`~metareweight.core.BilevelProblem`; a
per-layer rule for a layer type it must differentiate goes in ``metareweight/core/layers/``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union

from torch import Tensor

from ...data.batch import Batch
from ..problem import BilevelProblem, HypergradResult, WeightedTerms

_REGISTRY: Dict[str, Type["HypergradMethod"]] = {}


@dataclass
class HypergradMethod:
    """Base class: ``method(problem) -> HypergradResult``.

    Subclasses are dataclasses whose fields are the method's options. A subclass that sets ``name`` in its own
    class body registers under it; one that does not (a variant of a method, e.g. ``class Traced(Unrolled)``) is not
    registered and leaves its parent's name alone. A name already taken by another class is refused.

    Attributes:
        name: the registry name used in configs (``hypergrad="unrolled"``).
        exact: whether the result is the exact gradient of the k-step bilevel objective.
        returns_lookahead: whether :attr:`HypergradResult.lookahead` is filled in (the virtual parameters and
            optimizer state after the inner steps), which ``real_step="lookahead"`` commits. A method whose answer
            depends on its options declares it as a property.

    Capabilities are declared here and overridden by the methods that have them; :class:`~metareweight.MetaStep`
    reads them, it never probes a method for attributes.
    """

    name = "base"
    exact = False
    returns_lookahead = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):
            _register(cls)

    def __call__(self, problem: BilevelProblem) -> HypergradResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def replay(self, batch: Batch) -> Optional[Tuple[WeightedTerms, Dict[str, Tensor]]]:
        """The real step's ``(weighted terms, Σ_ik w_ik ∇ℓ_ik by parameter name)`` for ``batch`` from what the last
        call computed, with the weights recomputed from the objective's current φ and per-batch variables, or None
        when the method cannot reuse anything (the default; then the real step runs its own forward and backward).
        Called at most once per batch, right after the meta step and before the parameters change."""
        return None


def _register(cls: Type[HypergradMethod]) -> None:
    name = vars(cls)["name"]
    if not isinstance(name, str) or not name or name == "base":
        raise ValueError(f"{cls.__qualname__}.name must be a non-empty string other than 'base', got {name!r}")
    taken = _REGISTRY.get(name)
    if taken is not None and _qualified(taken) != _qualified(cls):  # the same class again (a module reload) is fine
        raise ValueError(f"hypergradient method name {name!r} is already registered by {_qualified(taken)}; give "
                         f"{_qualified(cls)} a name of its own (class attribute name = '...')")
    _REGISTRY[name] = cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def available_methods() -> list:
    """Names accepted by :func:`get_hypergradient`."""
    return sorted(_REGISTRY)


def get_hypergradient(method: Union[str, HypergradMethod], options: Optional[Mapping[str, Any]] = None
                      ) -> HypergradMethod:
    """Resolve a method name (plus options) or pass an instance through.

    Example:
        >>> get_hypergradient("neumann", {"terms": 5}).terms
        5
    """
    if isinstance(method, HypergradMethod):
        if options:
            raise ValueError("pass options either in the method instance or in hypergrad_options, not both")
        return method
    if not isinstance(method, str) or method not in _REGISTRY:
        hint = difflib.get_close_matches(str(method), _REGISTRY, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown hypergradient method {method!r}; choose one of {available_methods()}.{extra}")
    cls = _REGISTRY[method]
    options = dict(options or {})
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for hypergradient {method!r}; valid options: {sorted(valid)}")
    return cls(**options)
