"""The bilevel core: functional optimizer steps, the problem of one meta step, hypergradient methods."""

from .hypergrad import FiniteDifference, HypergradMethod, Neumann, Unrolled, available_methods, get_hypergradient
from .layers import LayerRule, register_layer_rule
from .optim import FunctionalOptimizer
from .problem import BilevelProblem, HypergradResult, WeightedTerms, bind

__all__ = ["BilevelProblem", "HypergradResult", "WeightedTerms", "bind", "FunctionalOptimizer", "HypergradMethod",
           "available_methods", "get_hypergradient", "Unrolled", "FiniteDifference", "Neumann",
           "LayerRule", "register_layer_rule"]
