from .backbones import InternViT, TinyCNN
from .decode_heads import FCNHead

__all__ = ['FCNHead', 'InternViT', 'TinyCNN']
