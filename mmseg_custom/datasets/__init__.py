from .ade_layout import ADELayoutDataset
from .max_image_num import ADE20KDataset
from .pipelines import PadShortSide, SETRResize
from .synthetic import generate_ade_layout

__all__ = ['ADE20KDataset', 'ADELayoutDataset', 'PadShortSide', 'SETRResize',
           'generate_ade_layout']
