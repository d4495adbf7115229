from .ade_layout import ADELayoutDataset
from .synthetic import generate_ade_layout

__all__ = ['ADELayoutDataset', 'generate_ade_layout']
