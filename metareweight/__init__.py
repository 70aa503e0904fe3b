"""metareweight: meta-learned sample reweighting by bilevel optimisation on ``torch.func``.

The public API::

    from metareweight import MetaTrainer, MetaWeightNet
    trainer = MetaTrainer(model, optimizer, train_loader, objective=MetaWeightNet(), meta_loader=clean_loader)
    trainer.fit(epochs=30)

or, in a loop of your own, one :class:`MetaStep` per model (``meta.step(train_batches, meta_batch)``).
"""

from .callbacks import Callback, JsonlLogger, read_jsonl
from .core import (BilevelProblem, FiniteDifference, FunctionalOptimizer, HypergradMethod, HypergradResult, Neumann,
                   Unrolled, WeightedTerms, available_methods, get_hypergradient)
from .core.hypergrad import Fast
from .core.layers import LayerRule, register_layer_rule
from .data import (Batch, IndexedDataset, MissingIndexWarning, TensorIndexedDataset, as_batch, long_tailed_indices,
                   pair_noise, symmetric_noise, with_index)
from .distributed import distributed_sampler
from .history import WeightHistory
from .losses import NonFiniteLossError, cross_entropy_terms, mse_terms
from .metrics import auroc
from .models import ModelInputError, ModelOutputError, math_attention, model_forward
from .core.strategy import Collectives
from .objectives import (DomainWeights, KDLoss, LearningToReweight, LSTMPolicy, MetaContext, MetaObjective,
                         MetaWeightNet, Reinforce,
                         ResetOptimizerState, SelfTaughtRescaler, SourceTaskWeighting, StepAggregationLoss,
                         TrilateralKD, teacher_class_means)
from .step import MetaStep, StepResult
from .trainer import MetaTrainer
from .tensorboard_logger import TensorBoardLogger
from .wandb_logger import WandbLogger

__version__ = "0.1.0"

__all__ = [
    # the trainer and the objectives (one per paper)
    "MetaTrainer", "MetaStep", "StepResult", "MetaObjective", "MetaContext", "MetaWeightNet", "LearningToReweight", "SelfTaughtRescaler", "ResetOptimizerState",
    "DomainWeights", "StepAggregationLoss", "SourceTaskWeighting", "LSTMPolicy", "Reinforce",
    "TrilateralKD", "KDLoss", "teacher_class_means",
    # the bilevel core and its hypergradient methods
    "BilevelProblem", "WeightedTerms", "HypergradResult", "HypergradMethod", "FunctionalOptimizer",
    "Unrolled", "Fast", "FiniteDifference", "Neumann", "available_methods", "get_hypergradient", "Collectives",
    "LayerRule", "register_layer_rule",
    # data, noise and analysis
    "Batch", "as_batch", "IndexedDataset", "TensorIndexedDataset", "symmetric_noise", "pair_noise",
    "long_tailed_indices", "WeightHistory", "auroc", "cross_entropy_terms", "NonFiniteLossError",
    "with_index", "MissingIndexWarning", "mse_terms",
    # models: how inputs reach the model and logits come back (Hugging Face models included)
    "model_forward", "math_attention", "ModelOutputError", "ModelInputError",
    # logging and scale
    "Callback", "JsonlLogger", "read_jsonl", "WandbLogger", "TensorBoardLogger", "distributed_sampler",
]
