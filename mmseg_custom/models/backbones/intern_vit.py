"""InternViT, InternVL's vision encoder, as an mmseg backbone (registered as ``InternViT6B``, the
name InternVL's segmentation configs use, and ``InternViT``).

Behaviour follows InternVL's ``InternViT6B`` wherever results depend on it:
- it casts itself to ``dtype`` (bfloat16, as InternVL) when built, so the cast happens before DDP
  wraps the model (DDP refuses a trainable module whose dtype changes afterwards);
- it returns float32 NCHW maps, one per ``out_indices`` block, or with ``with_fpn`` the four
  maps of InternVL's deconvolution pyramid (strides 4, 8, 16, 32 for patch 14: x4, x2, x1, /2);
- ``pos_embed`` is sized for ``img_size`` when built; a weight file's grid (224 px pretraining,
  504 px segmentation checkpoints) is resized to it at load (internvit_weights.py), and only an
  input of another size interpolates at run time (InternVL would fail there);
- with a weight file (``pretrained``) the ViT is not initialised at random first (every parameter
  comes from the file): it is built on the meta device, holds untouched memory in ``dtype``
  (a forward is refused) until ``init_weights`` takes the file's memory-mapped tensors
  (InternVL draws 5.9 B float32 values and casts them);
- ``freeze_vit`` freezes the ViT (patch embedding, tokens, blocks) but not the pyramid, which
  head tuning trains; ``unfreeze_pos_embed`` trains the position embedding again.

Attention is torch's ``scaled_dot_product_attention`` (flash kernels on GPU, no extra package), so
``use_flash_attn`` is accepted and needs nothing. Parameter names are InternVL's, so its files
load as they are; a file that leaves any ViT parameter unloaded is an error, never a silently
random backbone.
"""
import contextlib
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from mmcv.runner import BaseModule
from mmseg.models.builder import BACKBONES
from mmseg.utils import get_root_logger

from .internvit_weights import (BackboneWeightsError, backbone_state, read_state,
                                resize_patch_kernel, resize_pos_embed)

LoadReport = namedtuple('LoadReport', 'missing_keys unexpected_keys')  # as load_state_dict's
PYRAMID = ('up1.', 'up2.', 'up3.', 'up4.')  # parameter names new in head tuning, not in a file

PRESETS = {
    '6B': dict(embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0, qkv_bias=False,
               qk_normalization=True, norm_type='rms'),
    '300M': dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True,
                 qk_normalization=False, norm_type='ln'),
}


class RMSNorm(nn.Module):

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _norm(norm_type, dim):
    return RMSNorm(dim) if norm_type == 'rms' else nn.LayerNorm(dim, eps=1e-6)


class LayerScale(nn.Module):

    def __init__(self, dim, init_values, force_fp32=False):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))
        self.force_fp32 = force_fp32

    def forward(self, x):
        if self.force_fp32:
            return (x.float() * self.gamma.float()).to(x.dtype)
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's residual branch with probability p while training."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):

    def __init__(self, dim, num_heads, qkv_bias, qk_normalization, norm_type):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_normalization = qk_normalization
        if qk_normalization:  # over the full width, before the split into heads (as InternViT)
            self.q_norm = _norm(norm_type, dim)
            self.k_norm = _norm(norm_type, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):

    def __init__(self, patch_size, dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


class Block(nn.Module):

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_normalization, norm_type,
                 init_values, drop_path, layerscale_force_fp32):
        super().__init__()
        self.norm1 = _norm(norm_type, dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_normalization, norm_type)
        self.ls1 = (LayerScale(dim, init_values, layerscale_force_fp32) if init_values
                    else nn.Identity())
        self.norm2 = _norm(norm_type, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden)
        self.ls2 = (LayerScale(dim, init_values, layerscale_force_fp32) if init_values
                    else nn.Identity())
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map, computed in float32 (InternVL's pyramid)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = (x - x.mean(1, keepdim=True)) * torch.rsqrt(x.var(1, keepdim=True, unbiased=False)
                                                        + self.eps)
        return (self.weight.float()[:, None, None] * x + self.bias.float()[:, None, None]).to(dtype)


def _pyramid(dim, final_norm):
    """InternVL's four deconvolution branches (x4, x2, x1, /2), indexed as its checkpoints name
    them (``up1.0.weight``, ``up1.1.weight``, ``up1.3.weight``, ...)."""
    last = (lambda: LayerNorm2d(dim)) if final_norm else nn.Identity
    up1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), LayerNorm2d(dim), nn.GELU(),
                        nn.ConvTranspose2d(dim, dim, 2, 2), last())
    up2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), last())
    up3 = nn.Sequential(nn.Identity(), last())
    up4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2), last())
    for branch in (up1, up2, up3, up4):
        for m in branch.modules():
            if isinstance(m, nn.ConvTranspose2d):  # He init over fan-out, as InternVL
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
                nn.init.zeros_(m.bias)
    return up1, up2, up3, up4


DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


@BACKBONES.register_module(name='InternViT')
@BACKBONES.register_module(name='InternViT6B', force=True)
class InternViT(BaseModule):
    """InternViT encoder with InternVL's constructor arguments. ``preset='6B'`` (default) or
    ``'300M'`` fills the shape; explicit arguments override it.

    Args beyond InternVL's: ``preset``, ``norm_type`` ('rms' | 'ln'), ``layerscale_force_fp32``
    (the spelling InternVL's few-shot configs use), ``dtype`` (InternVL always casts to
    bfloat16; 'float32' suits toy CPU runs).
    """

    def __init__(self, preset=None, in_chans=3, pretrain_size=224, img_size=224, patch_size=14,
                 embed_dim=None, depth=None, num_heads=None, mlp_ratio=None, qkv_bias=None,
                 qk_normalization=None, norm_type=None, drop_path_rate=0.0, init_values=0.1,
                 with_cp=False, use_flash_attn=True, layerscale_force_fp32=False,
                 layerscale_no_force_fp32=None, freeze_vit=False, unfreeze_pos_embed=False,
                 with_fpn=False, with_final_norm=False, out_indices=(-1,), pretrained=None,
                 dtype='bfloat16', init_cfg=None):
        super().__init__(init_cfg)
        if layerscale_no_force_fp32 is not None:  # InternVL's other spelling
            layerscale_force_fp32 = not layerscale_no_force_fp32
        shape = dict(PRESETS['6B'] if preset is None else PRESETS[preset])
        given = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     qkv_bias=qkv_bias, qk_normalization=qk_normalization, norm_type=norm_type)
        shape.update({k: v for k, v in given.items() if v is not None})
        dim, depth = shape['embed_dim'], shape['depth']
        assert dim % shape['num_heads'] == 0, (
            f'InternViT: embed_dim={dim} is not divisible by num_heads={shape["num_heads"]}')
        assert dtype in DTYPES, f'InternViT: dtype={dtype!r}, expected one of {list(DTYPES)}'
        self.out_indices = [i % depth for i in out_indices]
        assert not with_fpn or len(self.out_indices) == 4, (
            f'InternViT: with_fpn needs 4 out_indices, got {list(out_indices)}')
        self.patch_size, self.pretrain_size, self.img_size = patch_size, pretrain_size, img_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.embed_dim = self.num_features = dim
        self.depth, self.with_cp, self.with_fpn = depth, with_cp, with_fpn
        self.freeze_vit, self.pretrained = freeze_vit, pretrained
        rates = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()  # meta builds too
        # With a weight file, every ViT parameter comes from it (init_weights refuses a file that
        # leaves one out): no random initialisation, no float32 copy. The ViT is built on the
        # meta device and materialised uninitialised in ``dtype``: pages never touched, which the
        # file's memory-mapped tensors replace (for InternViT-6B nothing of its own in host
        # memory, where zeros were 11.8 GB per worker and random draws 23.6 GB of float32:
        # benchmarks/results/internvit_build.md). Until the weights are loaded a forward is
        # refused (``_unloaded``), never computed from that memory.
        lazy = bool(pretrained) and torch.get_default_device().type != 'meta'
        with torch.device('meta') if lazy else contextlib.nullcontext():
            self.patch_embed = PatchEmbed(patch_size, dim, in_chans)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, dim))
            self.blocks = nn.ModuleList(Block(
                dim, shape['num_heads'], shape['mlp_ratio'], shape['qkv_bias'],
                shape['qk_normalization'], shape['norm_type'], init_values, rates[i],
                layerscale_force_fp32) for i in range(depth))
        self._unloaded = lazy
        if lazy:
            device = torch.get_default_device()
            self._apply(lambda t: torch.empty(t.shape, dtype=DTYPES[dtype], device=device))
        else:
            self._init_params()
        if freeze_vit:  # before the pyramid exists: head tuning trains it
            self.requires_grad_(False)
        if unfreeze_pos_embed:
            self.pos_embed.requires_grad_(True)
        if with_fpn:
            self.up1, self.up2, self.up3, self.up4 = _pyramid(dim, with_final_norm)
        self.to(DTYPES[dtype])

    @property
    def dtype(self):
        return self.patch_embed.proj.weight.dtype

    def _init_params(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def init_weights(self):
        """Load ``pretrained`` (any layout of internvit_weights.py), resizing ``pos_embed`` to
        this model's grid and the patch kernel to its patch size. Every ViT parameter must come
        from the file (the pyramid may not: it is new in head tuning)."""
        if not self.pretrained:  # some InternVL configs forgot to pass theirs: say so
            get_root_logger().warning('InternViT: no weight file (model.backbone.pretrained): '
                                      'the backbone starts from a random initialisation')
            return
        state, layout = backbone_state(read_state(self.pretrained))
        if 'pos_embed' in state:
            state['pos_embed'] = resize_pos_embed(state['pos_embed'], self.grid)
        if 'patch_embed.proj.weight' in state:
            state['patch_embed.proj.weight'] = resize_patch_kernel(
                state['patch_embed.proj.weight'], self.patch_size)
        own = self.state_dict()
        vit = [k for k in own if not k.startswith(PYRAMID)]
        missing = [k for k in vit if k not in state]
        where = f'InternViT weights {self.pretrained} ({layout} layout)'
        if missing:
            raise BackboneWeightsError(
                f'{where}: {len(missing)} of {len(vit)} backbone parameters are not in the file, '
                f'first: {", ".join(missing[:3])} (file keys start: '
                f'{", ".join(list(state)[:3])})')
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if wrong:
            k = wrong[0]
            raise BackboneWeightsError(f'{where}: {k} has shape {tuple(state[k].shape)} in the '
                                       f'file, {tuple(own[k].shape)} in this model')
        # The file's tensors become the parameters' data, converted only where the file's dtype
        # differs: a memory-mapped file of the model's dtype is never copied. The Parameter
        # objects stay (mmcv's init_weights refuses replaced ones; optimizers hold them).
        tensors = dict(self.named_parameters())
        tensors.update(self.named_buffers())
        taken = set()
        for key, value in state.items():
            if key in tensors:
                target = tensors[key]
                value = value.to(device=target.device, dtype=target.dtype)
                if value.numel() and value.data_ptr() in taken:  # a file's tied tensors
                    value = value.clone()
                taken.add(value.data_ptr())
                target.data = value
        self._unloaded = False
        result = LoadReport([k for k in own if k not in state],
                            [k for k in state if k not in own])
        get_root_logger().info(
            f'{where}: {len(state) - len(result.unexpected_keys)} tensors loaded, not in the '
            f'file: {result.missing_keys or "none"}, unused: {result.unexpected_keys or "none"}')
        self.load_report = result

    def train(self, mode=True):
        """The frozen ViT stays in eval mode (no drop path); the pyramid follows ``mode``, and the
        backbone counts as training only when a part of it trains."""
        super().train(mode)
        if self.freeze_vit:
            self.patch_embed.eval()
            self.blocks.eval()
            self.training = mode and self.with_fpn
        return self

    def _pos_embed(self, h, w):
        """Position embeddings for an h x w token grid: as built for ``img_size``, resized only
        for an input of another size."""
        if (h, w) == self.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, (h, w))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A load (torch's or mmcv's, a checkpoint's) that holds every ViT parameter at this
        model's shapes also counts as the weights loaded (mmcv skips a tensor of another shape,
        such as another grid's ``pos_embed``, with a warning: that load does not count)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._unloaded and all(
                prefix + k in state_dict and state_dict[prefix + k].shape == v.shape
                for k, v in self.state_dict(keep_vars=True).items()
                if not k.startswith(PYRAMID)):
            self._unloaded = False

    def forward(self, x):
        if self._unloaded:
            raise RuntimeError(f'InternViT: built for the weight file {self.pretrained}, which was '
                               'never loaded (init_weights, as mmseg\'s training calls it, or a '
                               'checkpoint holding the backbone)')
        x = self.patch_embed(x.to(self.dtype))
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self._pos_embed(h, w)
        outs = []
        # the blocks after the last one read feed no output: not computed (InternVL's linear
        # probe reads block 44 of 48, so 3 of every pass's 48 blocks were thrown away)
        for i, block in enumerate(self.blocks[:max(self.out_indices) + 1]):
            if self.with_cp and self.training and x.requires_grad:
                x = checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in self.out_indices:
                outs.append(x[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, h, w))
        if self.with_fpn:
            outs = [up(o) for up, o in zip((self.up1, self.up2, self.up3, self.up4), outs)]
        return tuple(o.contiguous().float() for o in outs)
