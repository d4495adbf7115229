from .multi_head import MultiHeadEncoderDecoder

__all__ = ['MultiHeadEncoderDecoder']
