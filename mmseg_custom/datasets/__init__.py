from .ade_layout import ADELayoutDataset
from .fewshot_subset import FewShotSubset
from .max_image_num import ADE20KDataset
from .pipelines import PadShortSide, SETRResize
from .synthetic import generate_ade_layout

__all__ = ['ADE20KDataset', 'ADELayoutDataset', 'FewShotSubset', 'PadShortSide', 'SETRResize',
           'generate_ade_layout']
