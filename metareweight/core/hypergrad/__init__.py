"""Hypergradient methods, one small module each, all ``method(problem) -> HypergradResult``."""

from .base import HypergradMethod, available_methods, get_hypergradient
from .fast import Fast, ForwardModeError
from .finite_difference import FiniteDifference
from .neumann import Neumann
from .unrolled import Unrolled

__all__ = ["HypergradMethod", "available_methods", "get_hypergradient", "Unrolled", "FiniteDifference", "Neumann", "Fast",
           "ForwardModeError"]
