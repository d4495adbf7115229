from .intern_vit import InternViT
from .tiny_cnn import TinyCNN

__all__ = ['InternViT', 'TinyCNN']
