"""InternViT on CPU at a tiny width (depth 2, width 64): shapes at InternVL's 504 crop, frozen
probing, bf16 features into the fp32 FCNHead, local weights, layer decay, an InternVL-style config."""
import copy
import os

import pytest
import torch

import mmseg_custom  # noqa: F401  (registrations)
from mmcv import Config
from mmseg.models import build_backbone, build_segmentor

TINY = dict(type='InternViT6B', pretrain_size=224, img_size=504, patch_size=14, embed_dim=64,
            depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=False, qk_normalization=True,
            drop_path_rate=0.0, init_values=0.1, with_cp=False, use_flash_attn=True,
            freeze_vit=False, out_indices=[1])


def _segmentor(freeze=False, num_classes=4, **backbone_kwargs):
    backbone = dict(TINY, freeze_vit=freeze, **backbone_kwargs)
    model = build_segmentor(dict(
        type='EncoderDecoder', backbone=backbone,
        decode_head=dict(type='FCNHead', in_channels=64, channels=64, num_convs=0,
                         concat_input=False, with_norm=False, num_classes=num_classes,
                         dropout_ratio=0.0, align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode='whole')))
    model.init_weights()
    return model


def _batch(size=56, n=2, num_classes=4):
    torch.manual_seed(0)
    img = torch.randn(n, 3, size, size)
    seg = torch.randint(0, num_classes, (n, 1, size, size))
    metas = [dict(img_shape=(size, size, 3), ori_shape=(size, size, 3), pad_shape=(size, size, 3),
                  flip=False)] * n
    return img, metas, seg


def test_504_crop_gives_36x36_tokens_and_other_sizes_interpolate_positions():
    backbone = build_backbone(dict(TINY, out_indices=[0, 1]))
    outs = backbone(torch.randn(1, 3, 504, 504))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 36, 36)] * 2
    assert backbone.pos_embed.shape[1] == 36 * 36 + 1  # sized for img_size, as InternVL
    assert tuple(backbone(torch.randn(1, 3, 56, 56))[0].shape) == (1, 64, 4, 4)


def test_the_pass_stops_after_the_last_block_read_with_the_same_features():
    """out_indices=[1] of 4 blocks: blocks 2 and 3 are not run, and block 1's features are
    bit-for-bit those of a pass through all 4 blocks (out_indices=[1, 3], same weights).
    Before: every pass ran all blocks (InternVL's linear probe: 48 for block 44's output)."""
    torch.manual_seed(0)
    whole = build_backbone(dict(TINY, depth=4, out_indices=[1, 3])).eval()
    short = build_backbone(dict(TINY, depth=4, out_indices=[1])).eval()
    short.load_state_dict(whole.state_dict())
    ran = []
    for i, block in enumerate(short.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        (features,) = short(x)
        reference = whole(x)[0]
    assert ran == [0, 1]
    assert torch.equal(features, reference)


def test_parameter_names_are_internvl_checkpoint_names():
    names = set(build_backbone(dict(TINY)).state_dict())
    assert {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight',
            'blocks.0.attn.q_norm.weight', 'blocks.0.attn.k_norm.weight', 'blocks.0.ls1.gamma',
            'blocks.0.mlp.fc1.weight', 'blocks.0.mlp.fc2.bias', 'blocks.1.norm2.weight'} <= names


def test_presets_have_internvit_shapes():
    from mmseg_custom.models.backbones.intern_vit import PRESETS
    assert PRESETS['6B'] == dict(embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0,
                                 qkv_bias=False, qk_normalization=True, norm_type='rms')
    small = build_backbone(dict(type='InternViT', preset='300M', depth=1, out_indices=[0]))
    assert small.embed_dim == 1024 and isinstance(small.blocks[0].norm1, torch.nn.LayerNorm)


def test_frozen_backbone_gets_no_gradient_and_stays_unchanged():
    model = _segmentor(freeze=True)
    model.train()
    assert not model.backbone.training and model.decode_head.training
    before = copy.deepcopy(model.backbone.state_dict())
    head_before = model.decode_head.conv_seg.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    img, metas, seg = _batch()
    loss = model.forward_train(img, metas, seg)['decode.loss_ce']
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.decode_head.conv_seg.weight)


def test_bf16_backbone_gives_fp32_features_logits_and_a_finite_loss():
    model = _segmentor(freeze=True)
    assert model.backbone.patch_embed.proj.weight.dtype == torch.bfloat16
    img, metas, seg = _batch()
    feats = model.extract_feat(img)
    assert feats[0].dtype == torch.float32  # InternVL returns fp32 maps
    logits = model.decode_head(feats)
    assert logits.dtype == torch.float32
    loss = model.forward_train(img, metas, seg)['decode.loss_ce']
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_local_weights_round_trip_reproduces_outputs(tmp_path, suffix):
    source = build_backbone(dict(TINY))
    source.eval()
    path = tmp_path / f'vit{suffix}'
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == '.pth':
        torch.save({'module': state}, path)  # wrappers are unwrapped
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    loaded = build_backbone(dict(TINY, pretrained=str(path)))
    loaded.init_weights()
    loaded.eval()
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(source(x)[0], loaded(x)[0])
    assert not loaded.load_report.missing_keys and not loaded.load_report.unexpected_keys


def test_with_a_weight_file_the_vit_is_not_drawn_at_random_first(tmp_path):
    """The file gives every ViT parameter: the build skips the random initialisation (and its
    float32 copy; benchmarks/internvit_build.py: 2.9-5.1x faster, the load included), draws
    nothing from torch's random stream, refuses a forward until the file is loaded, then holds
    exactly the file."""
    source = build_backbone(dict(TINY))
    torch.save(source.state_dict(), tmp_path / 'vit.pth')
    rng = torch.get_rng_state()
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'vit.pth')))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(RuntimeError, match='never loaded'):  # not computed from that memory
        model(torch.randn(1, 3, 56, 56))
    model.init_weights()
    assert all(torch.equal(p, source.state_dict()[n]) for n, p in model.named_parameters())
    # without a file the ViT is initialised at random, as InternVL's
    assert build_backbone(dict(TINY)).blocks[0].attn.qkv.weight.std() > 0


def test_renamed_key_is_an_error_never_a_random_backbone(tmp_path):
    from mmseg_custom.models.backbones.internvit_weights import BackboneWeightsError
    state = build_backbone(dict(TINY)).state_dict()
    state['blocks.0.attn.qkv_renamed.weight'] = state.pop('blocks.0.attn.qkv.weight')
    torch.save(state, tmp_path / 'renamed.pth')
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'renamed.pth')))
    with pytest.raises(BackboneWeightsError, match='first: blocks.0.attn.qkv.weight'):
        model.init_weights()


def test_missing_weights_file_is_a_clear_error(tmp_path):
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='nope.pth: no such file'):
        model.init_weights()


def test_layer_wise_learning_rates_follow_the_decay_rule():
    from mmcv.runner import build_optimizer
    model = _segmentor()
    optimizer = build_optimizer(model, dict(
        type='AdamW', lr=1.0, weight_decay=0.05, constructor='CustomLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(num_layers=2, layer_decay_rate=0.5)))
    lr = {g['name']: g['lr'] for g in optimizer.param_groups}
    wd = {g['name']: g['weight_decay'] for g in optimizer.param_groups}
    assert lr['backbone.pos_embed'] == lr['backbone.patch_embed.proj.weight'] == 0.5 ** 3
    assert lr['backbone.blocks.0.attn.qkv.weight'] == 0.5 ** 2
    assert lr['backbone.blocks.1.mlp.fc1.weight'] == 0.5
    assert lr['decode_head.conv_seg.weight'] == 1.0
    assert wd['backbone.blocks.1.mlp.fc1.weight'] == 0.05 and wd['backbone.blocks.1.mlp.fc1.bias'] == 0


INTERNVL_STYLE = '''
_base_ = ['{root}/configs/_base_/default_runtime.py']
deepspeed = False
deepspeed_config = 'zero_configs/adam_zero1_bf16.json'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder', pretrained=None,
    backbone=dict(type='InternViT6B', pretrain_size=224, img_size=56, patch_size=14,
                  embed_dim=64, depth=2, num_heads=4, mlp_ratio=4., qkv_bias=False,
                  drop_path_rate=0.1, init_values=0.1, with_cp=True, use_flash_attn=True,
                  qk_normalization=True, layerscale_force_fp32=False, freeze_vit=True,
                  out_indices=[1]),
    decode_head=dict(type='FCNHead', in_channels=64, channels=64, num_convs=0,
                     dropout_ratio=0.0, concat_input=False, num_classes=4, with_norm=True,
                     align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(), test_cfg=dict(mode='whole'))
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='Resize', img_scale=(56, 56), keep_ratio=False), dict(type='RandomFlip', prob=0.0),
    dict(type='Normalize', **img_norm_cfg), dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_semantic_seg'])]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=(56, 56), flip=False,
         transforms=[dict(type='Resize', keep_ratio=False), dict(type='Normalize', **img_norm_cfg),
                     dict(type='ImageToTensor', keys=['img']), dict(type='Collect', keys=['img'])])]
data = dict(
    samples_per_gpu=2, workers_per_gpu=0,
    train=dict(type='ADELayoutDataset', num_classes=4, data_root='{data}', img_dir='images/training',
               ann_dir='annotations/training', pipeline=train_pipeline, max_image_num=12),
    val=dict(type='ADELayoutDataset', num_classes=4, data_root='{data}',
             img_dir='images/validation', ann_dir='annotations/validation',
             pipeline=test_pipeline),
    test=dict(type='ADELayoutDataset', num_classes=4, data_root='{data}',
              img_dir='images/validation', ann_dir='annotations/validation',
              pipeline=test_pipeline))
optimizer = dict(type='AdamW', lr=4e-3, betas=(0.9, 0.999), weight_decay=0.05,
                 constructor='CustomLayerDecayOptimizerConstructor',
                 paramwise_cfg=dict(num_layers=2, layer_decay_rate=0.95))
optimizer_config = dict()
lr_config = dict(policy='poly', warmup='linear', warmup_iters=2, warmup_ratio=1e-6, power=1.0,
                 min_lr=0.0, by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=4)
checkpoint_config = dict(deepspeed=deepspeed, by_epoch=False, interval=4, max_keep_ckpts=1)
evaluation = dict(interval=4, metric='mIoU', save_best='auto')
custom_hooks = [dict(type='ToBFloat16Hook', priority=49)]
log_config = dict(interval=1, hooks=[dict(type='TextLoggerHook', by_epoch=False)])
'''


def test_internvl_style_config_builds_and_trains(tmp_path, synthetic_root):
    from pathlib import Path

    from mmseg.datasets import build_dataset
    from orchestrator import worker
    root = Path(__file__).resolve().parents[1]
    path = tmp_path / 'linear_intern_vit_tiny.py'
    path.write_text(INTERNVL_STYLE.format(root=root, data=synthetic_root))
    cfg = Config.fromfile(str(path))
    dataset = build_dataset(cfg.data.train)
    # max_image_num keeps the images the sweeps' few-shot wrapper keeps for seed 0
    whole = {k: v for k, v in cfg.data.train.items() if k != 'max_image_num'}
    cut = build_dataset(dict(type='FewShotSubset', dataset=whole, fraction=12 / 48, seed=0))
    assert len(dataset) == 12 and dataset.img_infos == cut.dataset.img_infos
    with pytest.warns(UserWarning, match='DeepSpeed'):
        metrics = worker.train(cfg, str(tmp_path / 'work'), source=str(path))
    assert metrics['iter'] == 4 and 0.0 <= metrics['mIoU'] <= 1.0
    log = next((tmp_path / 'work').glob('*.log')).read_text()
    assert 'ToBFloat16Hook: the backbone runs in bfloat16' in log and 'Iter [4/4]' in log


def test_shipped_internvl_configs_load_with_internvit_and_its_vocabulary():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / 'configs'
    probe = Config.fromfile(str(root / 'vit6b_fcn_linear_probe_ade20k_504.py'))
    fewshot = Config.fromfile(str(root / 'vit6b_fcn_fewshot_1of16_ade20k_504.py'))
    for cfg in (probe, fewshot):
        assert cfg.model.backbone.type == 'InternViT6B'
        assert cfg.model.decode_head.num_convs == 0 and cfg.model.decode_head.with_norm
        assert cfg.optimizer.constructor == 'CustomLayerDecayOptimizerConstructor'
        assert cfg.custom_hooks[0].type == 'ToBFloat16Hook'
    assert probe.model.backbone.freeze_vit and not fewshot.model.backbone.freeze_vit
    assert fewshot.data.train.max_image_num == 1263 and fewshot.runner.max_iters == 5000
    assert fewshot.lr_config.warmup_iters == 100


def _file_pages(path):
    """Address ranges of this process's mappings of ``path`` (the kernel's view, /proc)."""
    ranges = []
    with open('/proc/self/maps') as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == os.path.realpath(path):
                start, end = (int(x, 16) for x in fields[0].split('-'))
                ranges.append((start, end))
    return ranges


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_a_weight_file_of_the_models_dtype_becomes_its_parameters_without_a_copy(tmp_path, suffix):
    """A 12 GB bfloat16 file must not cost 12 GB more of host memory: after the segmentor's
    init_weights (mmcv's, as a training runs it), every ViT parameter's bytes lie in the file's
    own mapped pages (read from /proc/self/maps), the frozen ViT stays frozen, and the values
    are the file's."""
    source = build_backbone(dict(TINY))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f'vit{suffix}'
    if suffix == '.pth':
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    model = _segmentor(freeze=True, pretrained=str(path)).backbone
    pages = _file_pages(path)
    vit = dict(model.named_parameters())
    outside = [n for n, p in vit.items() if not any(a <= p.data_ptr() < b for a, b in pages)]
    assert pages and not outside, outside
    assert all(not p.requires_grad for p in vit.values())
    assert all(torch.equal(p, state[n]) for n, p in vit.items())


def test_the_pyramid_still_trains_beside_a_mapped_frozen_vit(tmp_path):
    torch.save(build_backbone(dict(TINY)).state_dict(), tmp_path / 'vit.pth')
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'vit.pth'), freeze_vit=True,
                                with_fpn=True, out_indices=[0, 1, 0, 1]))
    model.init_weights()
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(('up1.', 'up2.', 'up3.', 'up4.')) for n in trains)


def test_a_float32_weight_file_is_cast_to_the_models_dtype(tmp_path):
    source = build_backbone(dict(TINY))
    torch.save({k: v.float() + 1e-3 for k, v in source.state_dict().items()}, tmp_path / 'f.pth')
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'f.pth')))
    model.init_weights()
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, (source.state_dict()[name].float() + 1e-3).bfloat16())


def _rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def test_a_backbone_built_for_a_weight_file_touches_none_of_its_memory(tmp_path):
    """Each of a node's 8 workers building InternViT-6B for its file must not first fill 11.8 GB
    of its own: the resident memory (the kernel's count, /proc/self/statm) grows by a small part
    of the parameters' bytes while building (measured: zeros grew it by all of them)."""
    before = _rss_bytes()
    model = build_backbone(dict(type='InternViT', preset='6B', depth=2, img_size=224,
                                pretrain_size=224, pretrained=str(tmp_path / 'later.pth')))
    grown = _rss_bytes() - before
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size > 4e8 and grown < 0.1 * size, (grown, size)


def test_a_checkpoint_holding_the_backbone_counts_as_its_weights(tmp_path):
    """mmcv's load (a resumed or exported checkpoint with the backbone in it) loads the ViT as
    init_weights would: the forward then runs on the checkpoint's values."""
    from mmcv.runner import load_state_dict
    source = build_backbone(dict(TINY))
    source.eval()
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'never_read.pth')))
    load_state_dict(model, source.state_dict())
    model.eval()
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(model(x)[0], source(x)[0])


def test_tied_tensors_in_a_file_become_separate_parameters(tmp_path):
    source = build_backbone(dict(TINY))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state['blocks.1.mlp.fc1.weight'] = state['blocks.0.mlp.fc1.weight']  # one storage, saved once
    torch.save(state, tmp_path / 'tied.pth')
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'tied.pth')))
    model.init_weights()
    a, b = model.blocks[0].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_a_load_that_leaves_a_vit_tensor_out_still_refuses_the_forward(tmp_path):
    """mmcv's load skips a tensor of another shape (another grid's pos_embed) with a warning,
    and a head-only checkpoint holds no ViT tensor: neither is the backbone's weights."""
    from mmcv.runner import load_state_dict
    other_grid = build_backbone(dict(TINY, img_size=112)).state_dict()
    model = build_backbone(dict(TINY, pretrained=str(tmp_path / 'never_read.pth')))
    load_state_dict(model, other_grid)
    with pytest.raises(RuntimeError, match='never loaded'):
        model(torch.randn(1, 3, 56, 56))
    load_state_dict(model, {})
    with pytest.raises(RuntimeError, match='never loaded'):
        model(torch.randn(1, 3, 56, 56))
