from .layer_decay import CustomLayerDecayOptimizerConstructor

__all__ = ['CustomLayerDecayOptimizerConstructor']
