"""Meta-objectives: one module per paper, all on the :class:`MetaObjective` protocol."""

from .base import MetaObjective
from .mwnet import MetaWeightNet

__all__ = ["MetaObjective", "MetaWeightNet"]
