from .bf16 import ToBFloat16Hook
from .divergence import DivergenceHook, TrainingDiverged
from .eval_metrics import EvalMetricsHook
from .frozen_backbone import BackboneChanged, FrozenBackboneCheckpointHook
from .multi_head import HeadControlHook, MultiHeadEvalHook
from .stop_request import StopRequestHook, TrainingStopped

__all__ = ['BackboneChanged', 'DivergenceHook', 'EvalMetricsHook', 'FrozenBackboneCheckpointHook',
           'HeadControlHook', 'MultiHeadEvalHook', 'StopRequestHook', 'ToBFloat16Hook',
           'TrainingDiverged', 'TrainingStopped']
