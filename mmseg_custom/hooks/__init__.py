from .bf16 import ToBFloat16Hook
from .divergence import DivergenceHook, TrainingDiverged
from .eval_metrics import EvalMetricsHook
from .stop_request import StopRequestHook, TrainingStopped

__all__ = ['DivergenceHook', 'EvalMetricsHook', 'StopRequestHook', 'ToBFloat16Hook',
           'TrainingDiverged', 'TrainingStopped']
