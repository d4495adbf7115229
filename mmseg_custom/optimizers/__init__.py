from .layer_decay import CustomLayerDecayOptimizerConstructor
from .master_weights import Float32MasterWeightsConstructor
from .multi_head import MultiHeadOptimizerConstructor

__all__ = ['CustomLayerDecayOptimizerConstructor', 'Float32MasterWeightsConstructor',
           'MultiHeadOptimizerConstructor']
