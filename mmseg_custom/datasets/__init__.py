from .ade_layout import ADELayoutDataset
from .max_image_num import ADE20KDataset
from .synthetic import generate_ade_layout

__all__ = ['ADE20KDataset', 'ADELayoutDataset', 'generate_ade_layout']
