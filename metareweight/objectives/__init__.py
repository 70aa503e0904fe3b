"""Meta-objectives: one module per paper, all on the :class:`MetaObjective` protocol."""

from .base import MetaContext, MetaObjective
from .mwnet import MetaWeightNet
from .learning_to_reweight import LearningToReweight
from .self_taught import ResetOptimizerState, SelfTaughtRescaler
from .kd_baselines import KDLoss, kd_terms, wls_alpha
from .trilateral_kd import TrilateralKD, teacher_class_means
from .domain_weights import DomainWeights, StepAggregationLoss, meta_cross_entropy
from .policy import LSTMPolicy, Reinforce
from .source_tasks import SourceBalancedSampler, SourceBatches, SourceTaskWeighting, fine_tune

__all__ = [
    "MetaObjective", "MetaContext", "MetaWeightNet", "LearningToReweight", "SelfTaughtRescaler", "ResetOptimizerState",
    "KDLoss", "kd_terms", "wls_alpha", "TrilateralKD", "teacher_class_means",
    "DomainWeights", "StepAggregationLoss", "meta_cross_entropy",
    "LSTMPolicy", "Reinforce", "SourceTaskWeighting", "SourceBalancedSampler", "SourceBatches", "fine_tune",
]
