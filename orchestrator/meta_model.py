"""Models built on torch's meta device: parameter counts and feature shapes with no memory and
no weights (a 6B backbone plans in a second on a laptop)."""
import copy
import warnings


def _quiet_build(build, cfg):
    import torch
    import mmseg_custom  # noqa: F401  (our backbones and heads)
    with warnings.catch_warnings(), torch.device('meta'):
        # mmseg's CrossEntropyLoss notice on avg_non_ignore is for training, not for planning
        warnings.filterwarnings('ignore', message='Default ``avg_non_ignore``')
        return build(cfg)


def segmentor(model_cfg):
    """The segmentor of ``model_cfg`` (its weight files not read)."""
    from mmseg.models import build_segmentor
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.get('backbone', {}).pop('pretrained', None)
    model_cfg.pop('pretrained', None)
    return _quiet_build(build_segmentor, model_cfg)


def head(head_cfg):
    """The decode head of ``head_cfg``."""
    from mmseg.models import build_head
    return _quiet_build(build_head, copy.deepcopy(head_cfg))
