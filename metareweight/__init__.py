"""metareweight: meta-learned sample reweighting by bilevel optimisation on ``torch.func``.

The public API::

    from metareweight import MetaTrainer, MetaWeightNet
    trainer = MetaTrainer(model, optimizer, train_loader, objective=MetaWeightNet(), meta_loader=clean_loader)
    trainer.fit(epochs=30)
"""

from .callbacks import Callback, JsonlLogger, read_jsonl
from .core import (BilevelProblem, FiniteDifference, FunctionalOptimizer, HypergradMethod, HypergradResult, Neumann,
                   Unrolled, WeightedTerms, available_methods, get_hypergradient)
from .core.hypergrad import Fast
from .core.layers import LayerRule, register_layer_rule
from .data import (Batch, IndexedDataset, TensorIndexedDataset, as_batch, long_tailed_indices, pair_noise,
                   symmetric_noise)
from .distributed import distributed_sampler
from .history import WeightHistory
from .losses import NonFiniteLossError, cross_entropy_terms
from .metrics import auroc
from .objectives import (DomainWeights, KDLoss, LSTMPolicy, MetaObjective, MetaWeightNet, Reinforce,
                         ResetOptimizerState, SelfTaughtRescaler, SourceTaskWeighting, StepAggregationLoss,
                         TrilateralKD, teacher_class_means)
from .trainer import MetaTrainer
from .wandb_logger import WandbLogger

__version__ = "0.1.0"

__all__ = [
    # the trainer and the objectives (one per paper)
    "MetaTrainer", "MetaObjective", "MetaWeightNet", "SelfTaughtRescaler", "ResetOptimizerState",
    "DomainWeights", "StepAggregationLoss", "SourceTaskWeighting", "LSTMPolicy", "Reinforce",
    "TrilateralKD", "KDLoss", "teacher_class_means",
    # the bilevel core and its hypergradient methods
    "BilevelProblem", "WeightedTerms", "HypergradResult", "HypergradMethod", "FunctionalOptimizer",
    "Unrolled", "Fast", "FiniteDifference", "Neumann", "available_methods", "get_hypergradient",
    "LayerRule", "register_layer_rule",
    # data, noise and analysis
    "Batch", "as_batch", "IndexedDataset", "TensorIndexedDataset", "symmetric_noise", "pair_noise",
    "long_tailed_indices", "WeightHistory", "auroc", "cross_entropy_terms", "NonFiniteLossError",
    # logging and scale
    "Callback", "JsonlLogger", "read_jsonl", "WandbLogger", "distributed_sampler",
]
