from .eval_metrics import EvalMetricsHook

__all__ = ['EvalMetricsHook']
