from .divergence import DivergenceHook, TrainingDiverged
from .eval_metrics import EvalMetricsHook
from .stop_request import StopRequestHook, TrainingStopped

__all__ = ['DivergenceHook', 'EvalMetricsHook', 'StopRequestHook', 'TrainingDiverged',
           'TrainingStopped']
