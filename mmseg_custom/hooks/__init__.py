from .best_checkpoint import BestCheckpointLinkHook
from .bf16 import ToBFloat16Hook
from .divergence import DivergenceHook, TrainingDiverged
from .eval_metrics import EvalMetricsHook
from .fault_injection import FaultInjectionHook
from .frozen_backbone import BackboneChanged, FrozenBackboneCheckpointHook
from .group_checkpoint import TrialGroupCheckpointHook
from .multi_head import HeadControlHook, MultiHeadEvalHook
from .stop_request import StopRequestHook, TrainingStopped
from .val_features import ValFeatureCacheHook

__all__ = [
    'BackboneChanged', 'BestCheckpointLinkHook', 'DivergenceHook', 'EvalMetricsHook',
    'FaultInjectionHook', 'FrozenBackboneCheckpointHook', 'HeadControlHook',
    'MultiHeadEvalHook', 'StopRequestHook', 'ToBFloat16Hook', 'TrainingDiverged',
    'TrainingStopped', 'TrialGroupCheckpointHook', 'ValFeatureCacheHook']
