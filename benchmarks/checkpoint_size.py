"""Checkpoint size of a config with and without its frozen backbone, computed from the model's
shapes (built on the meta device: no memory, no weights), e.g. InternViT-6B's linear probe.

    .venv/bin/python benchmarks/checkpoint_size.py configs/vit6b_fcn_linear_probe_ade20k_504.py

A checkpoint holds the parameters and buffers in their dtype (the backbone in bf16, the heads in
fp32) and AdamW's two moments per trainable parameter (same dtype as the parameter). Printed,
never asserted.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sizes(config):
    import mmseg_custom  # noqa: F401
    from mmcv import Config
    from mmseg.models import build_segmentor
    cfg = Config.fromfile(config)
    cfg.model.backbone.pretrained = None
    with torch.device('meta'):
        model = build_segmentor(cfg.model)
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def nbytes(keys):
        return sum(state[k].numel() * state[k].element_size() for k in keys)
    moments = 2 * nbytes(trainable)  # AdamW: exp_avg, exp_avg_sq
    everything = nbytes(state) + moments
    without = nbytes([k for k in state if not k.startswith('backbone.')]) + moments
    frozen = not any(n.startswith('backbone.') for n in trainable)
    backbone = sum(state[k].numel() for k in state if k.startswith('backbone.'))
    return everything, (without if frozen else None), backbone


def main(argv):
    config = argv[1] if len(argv) > 1 else 'configs/vit6b_fcn_linear_probe_ade20k_504.py'
    everything, without, backbone = sizes(config)
    if without is None:
        print(f'{config}: backbone {backbone / 1e9:.2f} B parameters, trained: checkpoints hold '
              f'it, {everything / 1e9:.2f} GB with AdamW\'s moments')
        return
    print(f'{config}: backbone {backbone / 1e9:.2f} B parameters, frozen; a checkpoint with it '
          f'{everything / 1e9:.2f} GB, without it (FrozenBackboneCheckpointHook) '
          f'{without / 1e6:.1f} MB ({everything / without:.0f}x smaller)')


if __name__ == '__main__':
    main(sys.argv)
