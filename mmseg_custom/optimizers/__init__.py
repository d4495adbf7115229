from .layer_decay import CustomLayerDecayOptimizerConstructor
from .multi_head import MultiHeadOptimizerConstructor

__all__ = ['CustomLayerDecayOptimizerConstructor', 'MultiHeadOptimizerConstructor']
