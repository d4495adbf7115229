from .backbones import InternViT, TinyCNN
from .decode_heads import FCNHead
from .segmentors import MultiHeadEncoderDecoder

__all__ = ['FCNHead', 'InternViT', 'MultiHeadEncoderDecoder', 'TinyCNN']
