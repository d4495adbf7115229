"""InternViT, InternVL's vision encoder, as an mmseg backbone (registered as ``InternViT6B``, the
name InternVL's segmentation configs use, and ``InternViT``).

A plain ViT with patch 14, RMSNorm (or LayerNorm), optional QK normalization, layer scale and drop
path; attention is torch's ``scaled_dot_product_attention`` (flash kernels on GPU, no extra
package), so ``use_flash_attn`` in InternVL's configs is accepted and needs nothing. Position
embeddings are learned at ``pretrain_size`` and interpolated to the input's token grid.
``freeze_vit`` keeps the encoder in eval mode without gradients (probing). Weights load from a
local ``.pth``/``.safetensors`` file only, with missing and unexpected keys reported; parameter
names follow InternVL's (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``mlp.fc1``, ``ls1.gamma``,
...), so its checkpoints load as they are.
"""
import os.path as osp

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from mmcv.runner import BaseModule
from mmseg.models.builder import BACKBONES
from mmseg.utils import get_root_logger

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

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


class Block(nn.Module):

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_normalization, norm_type,
                 init_values, drop_path, layerscale_force_fp32):
        super().__init__()
        self.norm1 = _norm(norm_type, dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_normalization, norm_type)
        self.ls1 = LayerScale(dim, init_values, layerscale_force_fp32)
        self.norm2 = _norm(norm_type, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, init_values, layerscale_force_fp32)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def load_local_weights(path):
    """State dict from a local .pth/.pt or .safetensors file (never a hub); common wrappers
    ('model', 'state_dict', 'module.') are unwrapped."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'InternViT weights: {path}: no such file (weights are read from '
                                'local files only)')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('model', 'state_dict', 'module'):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


@BACKBONES.register_module(name='InternViT')
@BACKBONES.register_module(name='InternViT6B', force=True)
class InternViT(BaseModule):
    """InternViT encoder; outputs the patch tokens of ``out_indices`` blocks as (B, C, H/14, W/14)
    maps. ``preset='6B'`` or ``'300M'`` fills the shape; explicit arguments override it."""

    def __init__(self, preset=None, pretrain_size=224, img_size=224, patch_size=14,
                 embed_dim=None, depth=None, num_heads=None, mlp_ratio=None, qkv_bias=None,
                 qk_normalization=None, norm_type=None, drop_path_rate=0.0, init_values=0.1,
                 with_cp=False, use_flash_attn=True, layerscale_force_fp32=False,
                 layerscale_no_force_fp32=None, freeze_vit=False, out_indices=(-1,),
                 pretrained=None, init_cfg=None):
        super().__init__(init_cfg)
        if layerscale_no_force_fp32 is not None:  # the other spelling in InternVL's code
            layerscale_force_fp32 = not layerscale_no_force_fp32
        shape = dict(PRESETS['6B'] if preset is None else PRESETS[preset])
        given = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     qkv_bias=qkv_bias, qk_normalization=qk_normalization, norm_type=norm_type)
        shape.update({k: v for k, v in given.items() if v is not None})
        dim, depth = shape['embed_dim'], shape['depth']
        assert dim % shape['num_heads'] == 0, (
            f'InternViT: embed_dim={dim} is not divisible by num_heads={shape["num_heads"]}')
        self.patch_size, self.pretrain_size, self.img_size = patch_size, pretrain_size, img_size
        self.embed_dim, self.depth = dim, depth
        self.with_cp, self.freeze_vit, self.pretrained = with_cp, freeze_vit, pretrained
        self.out_indices = [i % depth for i in out_indices]
        self.patch_embed = PatchEmbed(patch_size, dim)
        grid = pretrain_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(
            dim, shape['num_heads'], shape['mlp_ratio'], shape['qkv_bias'],
            shape['qk_normalization'], shape['norm_type'], init_values, rates[i],
            layerscale_force_fp32) for i in range(depth))
        self._init_params()
        if freeze_vit:
            self.requires_grad_(False)

    def _init_params(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def init_weights(self):
        if not self.pretrained:
            return
        state = load_local_weights(self.pretrained)
        if 'pos_embed' in state and state['pos_embed'].shape != self.pos_embed.shape:
            raise ValueError(f'InternViT weights {self.pretrained}: pos_embed has shape '
                             f'{tuple(state["pos_embed"].shape)}, this model '
                             f'{tuple(self.pos_embed.shape)} (pretrain_size={self.pretrain_size})')
        result = self.load_state_dict(state, strict=False)
        logger = get_root_logger()
        logger.info(f'InternViT weights from {self.pretrained}: {len(state)} tensors, '
                    f'missing keys: {result.missing_keys or "none"}, '
                    f'unexpected keys: {result.unexpected_keys or "none"}')
        self.load_report = result
        if self.freeze_vit:
            self.requires_grad_(False)

    def train(self, mode=True):
        return super().train(mode and not self.freeze_vit)

    def _pos_embed(self, h, w):
        """Position embeddings for an h x w token grid (bicubic from the pretraining grid)."""
        cls_pos, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = self.pretrain_size // self.patch_size
        if (h, w) != (grid, grid):
            pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos.float(), size=(h, w), mode='bicubic', align_corners=False)
            pos = pos.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, pos], dim=1)

    def forward(self, x):
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))  # bf16 after ToBFloat16Hook
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self._pos_embed(h, w)
        outs = []
        for i, block in enumerate(self.blocks):
            if self.with_cp and self.training and x.requires_grad:
                x = checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in self.out_indices:
                outs.append(x[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, h, w))
        return tuple(outs)
