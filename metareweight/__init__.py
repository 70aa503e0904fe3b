"""metareweight: meta-learned sample reweighting by bilevel optimisation on ``torch.func``.

The public API::

    from metareweight import MetaTrainer, MetaWeightNet
    trainer = MetaTrainer(model, optimizer, train_loader, objective=MetaWeightNet(), meta_loader=clean_loader)
    trainer.fit(epochs=30)

or, in a loop of your own, one :class:`MetaStep` per model (``meta.step(train_batches, meta_batch)``).
"""

from .callbacks import Callback, JsonlLogger, read_jsonl
from .checkpoint import CheckpointError
from .core import (BilevelProblem, FiniteDifference, FunctionalOptimizer, HypergradMethod, HypergradResult, Neumann,
                   Unrolled, WeightedTerms, available_methods, get_hypergradient)
from .core.hypergrad import Fast, ForwardModeError
from .core.layers import LayerRule, register_layer_rule
from .core.strategy import Collectives
from .data import (Batch, IndexedDataset, MissingIndexWarning, TensorIndexedDataset, as_batch, long_tailed_indices,
                   pair_noise, symmetric_noise, with_index)
from .distributed import UnevenShardsError, distributed_sampler
from .evaluation import evaluate
from .health import HealthMonitor, HealthWarning
from .history import WeightHistory
from .losses import NonFiniteLossError, cross_entropy_terms, mse_terms
from .metrics import auroc
from .models import ModelConfigError, ModelInputError, ModelOutputError, math_attention, model_forward
from .objectives import (DomainWeights, KDLoss, LearningToReweight, LSTMPolicy, MetaContext, MetaObjective,
                         MetaWeightNet, Reinforce, ResetOptimizerState, SelfTaughtRescaler, SourceTaskWeighting,
                         StepAggregationLoss, TrilateralKD, teacher_class_means)
from .recorder import WeightRecorder
from .step import MetaStep, StepResult
from .tensorboard_logger import TensorBoardLogger
from .trainer import MetaTrainer
from .wandb_logger import WandbLogger

__version__ = "0.1.0"

__all__ = [
    # training: the loop, one step, evaluation
    "MetaTrainer", "MetaStep", "StepResult", "evaluate",
    # the objectives (one per paper) and their contract
    "MetaObjective", "MetaContext", "MetaWeightNet", "LearningToReweight", "SelfTaughtRescaler",
    "ResetOptimizerState", "DomainWeights", "StepAggregationLoss", "SourceTaskWeighting", "LSTMPolicy", "Reinforce",
    "TrilateralKD", "KDLoss", "teacher_class_means",
    # the bilevel core and its hypergradient methods
    "BilevelProblem", "WeightedTerms", "HypergradResult", "HypergradMethod", "FunctionalOptimizer", "Collectives",
    "Unrolled", "Fast", "FiniteDifference", "Neumann", "available_methods", "get_hypergradient",
    "LayerRule", "register_layer_rule",
    # data and noise
    "Batch", "as_batch", "IndexedDataset", "TensorIndexedDataset", "with_index", "symmetric_noise", "pair_noise",
    "long_tailed_indices",
    # losses, models (how inputs reach the model and logits come back, Hugging Face models included)
    "cross_entropy_terms", "mse_terms", "model_forward", "math_attention",
    # the weights and their analysis
    "WeightHistory", "WeightRecorder", "auroc",
    # logging, health and scale
    "Callback", "JsonlLogger", "read_jsonl", "WandbLogger", "TensorBoardLogger", "HealthMonitor",
    "distributed_sampler",
    # errors and warnings, each naming the problem and the fix
    "NonFiniteLossError", "ModelInputError", "ModelOutputError", "ModelConfigError", "ForwardModeError",
    "CheckpointError", "UnevenShardsError", "MissingIndexWarning", "HealthWarning",
]
