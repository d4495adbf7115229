from .eval_metrics import EvalMetricsHook
from .stop_request import StopRequestHook, TrainingStopped

__all__ = ['EvalMetricsHook', 'StopRequestHook', 'TrainingStopped']
