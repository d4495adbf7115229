from .fcn_head import FCNHead

__all__ = ['FCNHead']
