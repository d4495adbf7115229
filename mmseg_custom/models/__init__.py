from .backbones import TinyCNN
from .decode_heads import FCNHead

__all__ = ['FCNHead', 'TinyCNN']
