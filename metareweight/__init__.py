"""metareweight: meta-learned sample reweighting by bilevel optimisation on ``torch.func``.

The public API::

    from metareweight import MetaTrainer, MetaWeightNet
    trainer = MetaTrainer(model, optimizer, train_loader, objective=MetaWeightNet(), meta_loader=clean_loader)
    trainer.fit(epochs=30)
"""

from .callbacks import Callback, JsonlLogger, read_jsonl
from .core import (BilevelProblem, FiniteDifference, FunctionalOptimizer, HypergradMethod, HypergradResult, Neumann,
                   Unrolled, WeightedTerms, available_methods, get_hypergradient)
from .data import (Batch, IndexedDataset, TensorIndexedDataset, as_batch, long_tailed_indices, pair_noise,
                   symmetric_noise)
from .history import WeightHistory
from .losses import NonFiniteLossError, cross_entropy_terms
from .metrics import auroc
from .objectives import MetaObjective, MetaWeightNet
from .objectives import ResetOptimizerState, SelfTaughtRescaler
from .objectives import KDLoss, TrilateralKD, teacher_class_means
from .objectives import LSTMPolicy, Reinforce, SourceTaskWeighting
from .objectives import DomainWeights, StepAggregationLoss
from .trainer import MetaTrainer
from .distributed import distributed_sampler
from .wandb_logger import WandbLogger
from .core.hypergrad import Fast

__version__ = "0.1.0"

__all__ = [
    "MetaTrainer", "MetaObjective", "MetaWeightNet", "SelfTaughtRescaler", "ResetOptimizerState",
    "BilevelProblem", "WeightedTerms", "HypergradResult", "HypergradMethod", "FunctionalOptimizer",
    "Unrolled", "FiniteDifference", "Neumann", "Fast", "available_methods", "get_hypergradient",
    "Batch", "as_batch", "IndexedDataset", "TensorIndexedDataset", "symmetric_noise", "pair_noise",
    "long_tailed_indices", "WeightHistory", "Callback", "JsonlLogger", "read_jsonl", "auroc",
    "cross_entropy_terms", "NonFiniteLossError",
]
__all__ += ["SourceTaskWeighting", "LSTMPolicy", "Reinforce"]
__all__ += ["distributed_sampler", "WandbLogger"]
__all__ += ["DomainWeights", "StepAggregationLoss"]
