from .tiny_cnn import TinyCNN

__all__ = ['TinyCNN']
