"""InternViT weight files as researchers have them, mapped onto our parameter names.

Three layouts exist in the wild (all tested with synthetic files in tests/test_internvl_parity.py):

- InternVL's released pretrained file (``intern_vit_6b_224px.pth``): our names, no prefix,
  ``pos_embed`` on the 224 / 14 = 16 x 16 grid, sometimes wrapped in ``module``;
- a segmentation checkpoint InternVL trained (mmcv's format): ``state_dict`` holding the whole
  segmentor, backbone keys under ``backbone.``, ``pos_embed`` on the crop's grid (1297 tokens =
  36 x 36 + 1 at 504 px);
- HuggingFace's ``InternVisionModel`` (``model.safetensors`` of OpenGVLab/InternViT-*, or
  ``vision_model.*`` inside an InternVL chat model): ``embeddings.*``, ``encoder.layers.N.*``,
  layer scales as bare parameters ``ls1`` / ``ls2``.

``backbone_state`` returns the backbone's tensors under our names; the position embedding is
resized by the backbone itself (it knows its grid).
"""
import os.path as osp
import re

import torch

HF_RENAMES = (
    (re.compile(r'^embeddings\.class_embedding$'), 'cls_token'),
    (re.compile(r'^embeddings\.position_embedding$'), 'pos_embed'),
    (re.compile(r'^embeddings\.patch_embedding\.'), 'patch_embed.proj.'),
    (re.compile(r'^encoder\.layers\.(\d+)\.(ls[12])$'), r'blocks.\1.\2.gamma'),
    (re.compile(r'^encoder\.layers\.(\d+)\.'), r'blocks.\1.'),
)


class BackboneWeightsError(ValueError):
    """A weight file that would leave backbone parameters at their random initialisation."""


def read_state(path):
    """The tensors of a local ``.pth`` / ``.pt`` / ``.safetensors`` file (never a hub download),
    memory-mapped: their bytes stay in the file's pages (shared by every process on the node that
    maps the same file) until a tensor is read, so a 12 GB file costs no second copy in host
    memory when the model takes the tensors as they are (``InternViT.init_weights``)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'InternViT weights: {path}: no such file (weights are read from '
                                'local files only)')
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt', device='cpu') as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError as err:  # torch's pre-1.6 format cannot be mapped: read it whole
        if 'mmap' not in str(err):
            raise
        return torch.load(path, map_location='cpu', weights_only=True)


def layout_of(state):
    """'hf', 'segmentor' or 'internvl' (our names), from the keys."""
    keys = list(state)
    if any(k.startswith(('embeddings.', 'encoder.layers.', 'vision_model.')) for k in keys):
        return 'hf'
    if any(k.startswith('backbone.') for k in keys):
        return 'segmentor'
    return 'internvl'


def _unwrap(state):
    for key in ('state_dict', 'model', 'module'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return _unwrap(state[key])
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def _from_hf(state):
    out = {}
    for key, value in state.items():
        if key.startswith('vision_model.'):
            key = key[len('vision_model.'):]
        elif not key.startswith(('embeddings.', 'encoder.')):
            continue  # a chat model's language model and projector
        for pattern, repl in HF_RENAMES:
            key, n = pattern.subn(repl, key)
            if n:
                break
        out[key] = value
    return out


def backbone_state(raw):
    """(state under our names, layout name) from a loaded file of any of the three layouts."""
    state = _unwrap(raw)
    layout = layout_of(state)
    if layout == 'hf':
        state = _from_hf(state)
    elif layout == 'segmentor':
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return state, layout


def resize_pos_embed(pos_embed, grid):
    """(1, 1 + g*g, C) -> (1, 1 + h*w, C) for grid (h, w): the class token's embedding is kept, the
    patch grid is resized bicubically (as InternVL does at load). Square source grids only."""
    n = pos_embed.shape[1] - 1
    side = int(round(n ** 0.5))
    if side * side != n:
        raise BackboneWeightsError(f'pos_embed with {n} patch positions is not a square grid')
    if (side, side) == tuple(grid):
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = torch.nn.functional.interpolate(patches, size=tuple(grid), mode='bicubic',
                                              align_corners=False)
    patches = patches.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def resize_patch_kernel(weight, patch_size):
    """A patch-embedding kernel of another patch size, resized bicubically (InternVL's load)."""
    if tuple(weight.shape[-2:]) == (patch_size, patch_size):
        return weight
    return torch.nn.functional.interpolate(weight.float(), size=(patch_size, patch_size),
                                           mode='bicubic', align_corners=False).to(weight.dtype)
