"""InternVL's own segmentation work runs here unchanged: its four config families (our tiny
configs in configs/internvl_tiny/, written to InternVL's settings), its backbone behaviour, its
three checkpoint layouts, its weight-decay rule, its pipeline steps."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmseg_custom  # noqa: F401  (registrations)
from mmcv import Config
from mmseg.models import build_backbone

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ROOT / 'configs' / 'internvl_tiny'
# every type and key InternVL's configs/intern_vit_6b/ tree uses beyond mmseg's own
VOCABULARY = ('SETR_Resize', 'PadShortSide', 'TensorboardLoggerHook', 'ToBFloat16Hook',
              'CustomLayerDecayOptimizerConstructor', 'InternViT6B', 'with_fpn',
              'unfreeze_pos_embed', 'layerscale_no_force_fp32', 'layerscale_force_fp32',
              'use_flash_attn', 'max_image_num', 'deepspeed_config', 'save_best')
VIT = dict(type='InternViT6B', pretrain_size=224, img_size=504, patch_size=14, embed_dim=64,
           depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=False, qk_normalization=True,
           init_values=0.1, with_cp=False, freeze_vit=True, out_indices=[1])


@pytest.fixture(scope='module')
def ade150(tmp_path_factory):
    """Generated data in ADE20K's layout with its 150 classes (ADE20KDataset fixes them)."""
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    return generate_ade_layout(tmp_path_factory.mktemp('ade150') / 'data', num_classes=150,
                               num_train=24, num_val=4, size=64)


def _family(name, data_root, **options):
    cfg = Config.fromfile(str(FAMILIES / f'{name}.py'))
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(data_root)
    cfg.merge_from_dict(options)
    return cfg


def _tiny_vit_file(path, **kw):
    """A random tiny InternViT's weights in InternVL's released layout (224-px grid)."""
    vit = build_backbone(dict(VIT, img_size=224, **kw))
    torch.save({'module': {k: v.float() for k, v in vit.state_dict().items()}}, path)
    return path


def test_the_tiny_family_configs_use_all_of_internvls_vocabulary():
    text = '\n'.join(p.read_text() for p in FAMILIES.rglob('*.py'))
    assert [term for term in VOCABULARY if term not in text] == []


@pytest.mark.parametrize('family', ['linear_probing', 'few_shot_1of4', 'head_tuning'])
def test_each_family_trains_and_evaluates(family, ade150, tmp_path):
    from orchestrator import worker
    weights = _tiny_vit_file(tmp_path / 'vit.pth', depth=4)
    cfg = _family(family, ade150, **{'model.backbone.pretrained': str(weights)})
    with pytest.warns(UserWarning, match='DeepSpeed'):
        metrics = worker.train(cfg, str(tmp_path / 'work'), source=family)
    assert metrics['iter'] == 2 and 0.0 <= metrics['mIoU'] <= 1.0 and len(metrics) > 150
    assert list((tmp_path / 'work' / 'tf_logs').glob('events.out.tfevents.*'))  # TensorBoard
    log = next((tmp_path / 'work').glob('*.log')).read_text()
    assert 'ToBFloat16Hook: the backbone runs in bfloat16' in log
    assert '(internvl layout): ' in log and 'tensors loaded' in log  # not a random backbone
    checkpoint = torch.load(tmp_path / 'work' / 'iter_2.pth', map_location='cpu',
                            weights_only=False)
    state = checkpoint['state_dict']
    source = torch.load(weights, weights_only=True)['module']
    block = 'backbone.blocks.3.mlp.fc1.weight'
    if family == 'linear_probing':  # wholly frozen: checkpoints name its file instead
        assert block not in state
        assert checkpoint['meta']['frozen_backbone']['weights'] == str(weights)
    else:  # head tuning trains the pyramid, few-shot the whole backbone: saved with it
        assert state[block].dtype == torch.bfloat16
        loaded = source[block[len('backbone.'):]].bfloat16()
        trained = not torch.equal(state[block], loaded)
        assert trained == (family == 'few_shot_1of4')  # only the few-shot protocol fine-tunes
    if family == 'few_shot_1of4':
        from mmseg.datasets import build_dataset
        assert len(build_dataset(cfg.data.train)) == 6  # max_image_num = 24 // 4


def test_full_tuning_trains_an_unfrozen_bf16_internvit_on_two_gloo_workers(ade150, tmp_path,
                                                                          cli_env):
    weights = _tiny_vit_file(tmp_path / 'vit.pth', depth=4)
    work = tmp_path / 'work'
    roots = [f'data.{s}.data_root={ade150}' for s in ('train', 'val', 'test')]
    proc = subprocess.run(
        [sys.executable, '-m', 'orchestrator.cli', 'train', str(FAMILIES / 'full_tuning.py'),
         '--workers', '2', '--work-dir', str(work), '--cfg-options', *roots,
         f'model.backbone.pretrained={weights}'],
        capture_output=True, text=True, env=cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sync = json.loads((work / 'rank_sync.json').read_text())
    assert sync['world_size'] == 2
    assert len(set(sync['backbone_sha256'])) == 1 and len(set(sync['decode_head_sha256'])) == 1
    state = torch.load(work / 'iter_2.pth', map_location='cpu', weights_only=False)['state_dict']
    source = torch.load(weights, weights_only=True)['module']
    for key in ('blocks.0.attn.qkv.weight', 'pos_embed', 'patch_embed.proj.weight'):
        assert state['backbone.' + key].dtype == torch.bfloat16
    assert not torch.equal(state['backbone.blocks.0.attn.qkv.weight'].float(),
                           source['blocks.0.attn.qkv.weight'].bfloat16().float())
    assert state['decode_head.conv_seg.weight'].dtype == torch.float32


# -- backbone behaviour ---------------------------------------------------------------------------

def test_built_in_bf16_returns_fp32_nchw_and_sizes_pos_embed_for_img_size():
    vit = build_backbone(dict(VIT, out_indices=[0, 1]))
    assert {p.dtype for p in vit.parameters()} == {torch.bfloat16}  # before any wrapping
    assert vit.pos_embed.shape == (1, 36 * 36 + 1, 64)  # InternVL: 1297 tokens at 504 px
    outs = vit(torch.randn(1, 3, 504, 504))
    assert [(tuple(o.shape), o.dtype, o.is_contiguous()) for o in outs] == \
        [((1, 64, 36, 36), torch.float32, True)] * 2


def test_fpn_gives_four_scales_and_stays_trainable_when_the_vit_is_frozen():
    vit = build_backbone(dict(VIT, img_size=56, depth=4, out_indices=[0, 1, 2, 3],
                              with_fpn=True, with_final_norm=True, unfreeze_pos_embed=True))
    outs = vit(torch.randn(2, 3, 56, 56))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(o.dtype == torch.float32 for o in outs)
    trainable = {n.split('.')[0] for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {'up1', 'up2', 'up3', 'up4', 'pos_embed'}
    assert {'up1.0.weight', 'up1.1.weight', 'up1.3.weight', 'up1.4.weight', 'up2.1.bias',
            'up3.1.weight', 'up4.1.weight'} <= set(vit.state_dict())  # InternVL's names
    vit.train()
    assert not vit.blocks.training and vit.up1.training


def test_bf16_hook_refuses_a_trainable_fp32_backbone_already_wrapped():
    from types import SimpleNamespace

    from mmcv.parallel import MMDataParallel
    from mmseg.models import build_segmentor

    from mmseg_custom.hooks import ToBFloat16Hook
    model = build_segmentor(dict(
        type='EncoderDecoder', backbone=dict(VIT, freeze_vit=False, dtype='float32'),
        decode_head=dict(type='FCNHead', in_channels=64, channels=64, num_convs=0,
                         concat_input=False, num_classes=4)))
    runner = SimpleNamespace(model=MMDataParallel(model), logger=None)
    with pytest.raises(RuntimeError, match='build it in bfloat16'):
        ToBFloat16Hook().before_run(runner)


def test_weight_decay_and_layer_ids_follow_internvls_runs():
    from mmcv.runner import build_optimizer
    from mmseg.models import build_segmentor
    model = build_segmentor(dict(
        type='EncoderDecoder',
        backbone=dict(VIT, img_size=56, depth=4, out_indices=[0, 1, 2, 3], with_fpn=True,
                      freeze_vit=False),
        decode_head=dict(type='UPerHead', in_channels=[64] * 4, in_index=[0, 1, 2, 3],
                         channels=16, num_classes=4)))
    optimizer = build_optimizer(model, dict(
        type='AdamW', lr=1.0, weight_decay=0.05, constructor='CustomLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(num_layers=4, layer_decay_rate=0.5)))
    group = {g['name']: g for g in optimizer.param_groups}
    # InternVL exempts 'pos_embed'/'cls_token' by bare name, which never matches: decayed there
    assert group['backbone.pos_embed']['weight_decay'] == 0.05
    assert group['backbone.cls_token']['weight_decay'] == 0.05
    assert group['backbone.blocks.0.ls1.gamma']['weight_decay'] == 0.0  # 1-D
    assert group['backbone.up1.0.bias']['weight_decay'] == 0.0
    assert group['backbone.up1.0.weight']['weight_decay'] == 0.05
    assert group['backbone.pos_embed']['lr'] == 0.5 ** 5
    assert group['backbone.blocks.3.mlp.fc2.weight']['lr'] == 0.5
    assert group['backbone.up1.0.weight']['lr'] == group['decode_head.conv_seg.weight']['lr'] == 1


def test_setr_resize_keeps_the_short_side_at_least_the_crop():
    from mmseg.datasets.pipelines import Compose
    img = np.zeros((30, 200, 3), np.uint8)
    seg = np.zeros((30, 200), np.uint8)

    def run(step):
        return Compose([step])(dict(img=img, gt_semantic_seg=seg, seg_fields=['gt_semantic_seg'],
                                    scale=(224, 56)))

    setr = run(dict(type='SETR_Resize', keep_ratio=True, crop_size=(56, 56), setr_multi_scale=True))
    plain = run(dict(type='Resize', keep_ratio=True))
    assert setr['img'].shape[:2] == (56, 373) and setr['gt_semantic_seg'].shape == (56, 373)
    assert plain['img'].shape[:2] == (34, 224)  # mmseg's fit-inside rule, for comparison


def test_pad_short_side_pads_small_images_only():
    from mmseg.datasets.pipelines import Compose
    pad = Compose([dict(type='PadShortSide', size=56, pad_val=0, seg_pad_val=255)])
    out = pad(dict(img=np.ones((40, 80, 3), np.uint8), gt_semantic_seg=np.ones((40, 80), np.uint8),
                   seg_fields=['gt_semantic_seg']))
    assert out['img'].shape == (56, 80, 3) and out['pad_shape'] == (56, 80, 3)
    assert (out['gt_semantic_seg'][40:] == 255).all() and (out['gt_semantic_seg'][:40] == 1).all()
    big = np.ones((60, 70, 3), np.uint8)
    assert pad(dict(img=big, seg_fields=[]))['img'] is big


# -- checkpoint layouts ---------------------------------------------------------------------------

def _reference(img_size=504):
    vit = build_backbone(dict(VIT, img_size=img_size))
    vit.eval()
    return vit


def _load(path, **kw):
    vit = build_backbone(dict(VIT, pretrained=str(path), **kw))
    vit.init_weights()
    vit.eval()
    return vit


def test_released_layout_224_grid_loads_completely_and_is_resized(tmp_path):
    from mmseg_custom.models.backbones.internvit_weights import resize_pos_embed
    source = _reference(img_size=224)
    state = {k: v.float() for k, v in source.state_dict().items()}
    assert state['pos_embed'].shape[1] == 16 * 16 + 1
    torch.save({'module': state}, tmp_path / 'intern_vit_6b_224px.pth')
    vit = _load(tmp_path / 'intern_vit_6b_224px.pth')
    assert vit.load_report.missing_keys == [] and vit.load_report.unexpected_keys == []
    expected = resize_pos_embed(state['pos_embed'], (36, 36)).bfloat16()
    assert torch.equal(vit.pos_embed.detach(), expected)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_trained_segmentation_layout_loads_exactly_also_through_mmcv(tmp_path):
    from mmcv.runner import load_checkpoint
    from mmseg.models import build_segmentor
    source = _reference()
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    assert state['backbone.pos_embed'].shape[1] == 1297
    state['decode_head.conv_seg.weight'] = torch.zeros(150, 64, 1, 1)
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'iter_80000.pth')
    vit = _load(tmp_path / 'iter_80000.pth')
    assert vit.load_report.missing_keys == []
    x = torch.randn(1, 3, 504, 504)
    assert torch.equal(vit(x)[0], source(x)[0])
    # mmseg's load_from / test.py path: the whole segmentor, strict
    model = build_segmentor(dict(type='EncoderDecoder', backbone=dict(VIT),
                                 decode_head=dict(type='FCNHead', in_channels=64, channels=64,
                                                  num_convs=0, concat_input=False,
                                                  num_classes=150)))
    load_checkpoint(model, str(tmp_path / 'iter_80000.pth'), strict=False)
    assert torch.equal(model.backbone.pos_embed, source.pos_embed)


def test_huggingface_layout_is_mapped(tmp_path):
    from safetensors.torch import save_file
    source = _reference()
    hf = {}
    for key, value in source.state_dict().items():
        key = (key.replace('cls_token', 'embeddings.class_embedding')
               .replace('pos_embed', 'embeddings.position_embedding')
               .replace('patch_embed.proj', 'embeddings.patch_embedding')
               .replace('blocks.', 'encoder.layers.').replace('.gamma', ''))
        hf['vision_model.' + key] = value.contiguous()
    hf['mlp1.0.weight'] = torch.zeros(4)  # a chat model's projector: not the backbone's
    save_file(hf, str(tmp_path / 'model.safetensors'))
    vit = _load(tmp_path / 'model.safetensors')
    assert vit.load_report.missing_keys == []
    x = torch.randn(1, 3, 504, 504)
    assert torch.equal(vit(x)[0], source(x)[0])


def test_a_missing_backbone_key_is_a_one_line_error_naming_file_and_keys(tmp_path):
    from orchestrator import worker
    from orchestrator.errors import ConfigError
    from mmseg.models import build_segmentor
    state = {k: v.float() for k, v in _reference().state_dict().items()}
    state.pop('blocks.1.attn.qkv.weight')
    state['blocks.1.attn.qkv_renamed.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'renamed.pth')
    model = build_segmentor(dict(
        type='EncoderDecoder', backbone=dict(VIT, pretrained=str(tmp_path / 'renamed.pth')),
        decode_head=dict(type='FCNHead', in_channels=64, channels=64, num_convs=0,
                         concat_input=False, num_classes=4)))
    with pytest.raises(ConfigError) as e:
        worker.load_weights(model, 'study.py')
    message = str(e.value)
    assert '\n' not in message and 'renamed.pth' in message
    assert 'blocks.1.attn.qkv.weight' in message and message.startswith('study.py: ')


def test_only_a_wholly_frozen_backbone_groups():
    """Head tuning freezes the ViT but trains InternVL's pyramid: its trials cannot share one
    backbone pass."""
    from orchestrator.fine_tuning import frozen_backbone
    probe = Config.fromfile(str(FAMILIES / 'linear_probing.py'))._cfg_dict.to_dict()
    heads = Config.fromfile(str(FAMILIES / 'head_tuning.py'))._cfg_dict.to_dict()
    assert frozen_backbone(probe, {}) and not frozen_backbone(heads, {})
    assert not frozen_backbone(probe, {'model.backbone.unfreeze_pos_embed': True})


def test_max_image_num_subset_follows_the_runs_seed_as_internvls(ade150):
    """InternVL shuffles with the run's seed: another seed, another subset; one seed, one subset
    on every rank and run."""
    from mmseg.datasets import build_dataset

    from orchestrator import worker

    def kept(seed):
        cfg = _family('few_shot_1of4', ade150, seed=seed)
        worker._start_run(cfg)
        whole = {k: v for k, v in cfg.data.train.items()
                 if k not in ('max_image_num', 'subset_seed')}
        cut = build_dataset(dict(type='FewShotSubset', dataset=whole, fraction=6 / 24, seed=seed))
        infos = build_dataset(cfg.data.train).img_infos
        assert infos == cut.dataset.img_infos  # the seeded rule of the sweeps' fractions
        return infos
    assert len(kept(1)) == 6 and kept(1) != kept(2)


def test_a_searched_fraction_replaces_internvls_max_image_num(tmp_path):
    import yaml

    from orchestrator.plan import resolve
    from orchestrator.spec import load_spec

    def overrides(parameters):
        path = tmp_path / 'space.yaml'
        path.write_text(yaml.safe_dump(dict(
            base_config=str(ROOT / 'configs' / 'vit6b_fcn_fewshot_1of16_ade20k_504.py'),
            parameters=parameters, fewshot={'seeds': [3]},
            derived={'iterations': {'at_full_data': 80000}, 'warmup': {'ratio': 0.02,
                                                                       'max': 1500}})))
        spec, base = load_spec(path)
        values = {k: v['grid'][0] for k, v in parameters.items()}
        return resolve(spec, base._cfg_dict.to_dict(), values)[0]
    searched = overrides({'fewshot.fraction': {'grid': [0.25]}})
    assert searched['data.train.max_image_num'] is None  # the fraction's subset instead
    assert searched['data.train.subset_seed'] == 3 and searched['lr_config.warmup_iters'] == 400


def test_a_max_image_num_config_records_and_schedules_the_fraction_it_trains(ade150, tmp_path):
    """InternVL's few-shot family keeps max_image_num = 24 // 4 = 6 of the 24 generated
    images and no fraction is searched: the sweep records fraction 0.25, derives a quarter of
    the full-data iterations (800 -> 200) and warmup (2 % of 200 = 4), and its split file
    holds the very images `orchestrator train` keeps for that config and seed (the run's
    seed, as InternVL's); where the images are not here, the dry run says so."""
    import yaml
    from mmseg.datasets import build_dataset

    from orchestrator import worker
    from orchestrator.plan import resolve, settle_base_fraction
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import PlannedTrial
    from orchestrator.trial_config import trial_config

    def space(data_root):
        path = tmp_path / 'space.yaml'
        path.write_text(yaml.safe_dump(dict(
            base_config=str(FAMILIES / 'few_shot_1of4.py'), data_root=str(data_root),
            parameters={'model.decode_head.with_norm': {'grid': [True]}}, repeats=2,
            derived={'iterations': {'at_full_data': 800}, 'warmup': {'ratio': 0.02}})))
        spec, base_cfg = load_spec(path)
        return spec, base_cfg._cfg_dict.to_dict()
    spec, base = space(tmp_path / 'elsewhere')
    assert 'is not here to count them' in settle_base_fraction(spec, base)
    spec, base = space(ade150)
    assert settle_base_fraction(spec, base).endswith('max_image_num=6 of 24 training images)')
    for seed in (0, 1):
        params = {'model.decode_head.with_norm': True, 'seed': seed}
        overrides, derived = resolve(spec, base, params)
        assert derived['fewshot.fraction'] == 0.25 and derived['fewshot.seed'] == seed
        assert overrides['runner.max_iters'] == 200 and overrides['lr_config.warmup_iters'] == 4
        trial = PlannedTrial(seed, params, {}, overrides, derived)
        (tmp_path / f'trial{seed}').mkdir()
        swept_cfg = trial_config(base, str(FAMILIES / 'few_shot_1of4.py'), trial,
                                 str(tmp_path / f'trial{seed}'))
        swept = build_dataset(swept_cfg.data.train)  # as the sweep's workers build it
        recorded = (tmp_path / f'trial{seed}' / 'fewshot_subset.txt').read_text().split()
        cfg = _family('few_shot_1of4', ade150, seed=seed)  # as `orchestrator train` runs it
        worker._start_run(cfg)
        trained = [i['filename'][:-len('.jpg')] for i in build_dataset(cfg.data.train).img_infos]
        assert len(recorded) == 6 and sorted(recorded) == sorted(trained)
        assert [i['filename'][:-len('.jpg')] for i in swept.dataset.img_infos] == recorded


def test_a_sweep_runs_on_an_internvl_config_with_its_checkpoint(ade150, tmp_path, ray_address,
                                                                monkeypatch):
    """base_config: an InternVL-family file; the checkpoint set by ``overrides`` with a relative
    path (the directory the sweep starts from); two heads in one trial group, each child with
    its subset seed and the derived warmup."""
    import yaml
    from mlflow.tracking import MlflowClient

    from orchestrator import cli
    _tiny_vit_file(tmp_path / 'intern_vit_tiny_224px.pth', depth=4)
    monkeypatch.chdir(tmp_path)
    space = dict(
        name='internvl', base_config=str(FAMILIES / 'linear_probing.py'), data_root=str(ade150),
        overrides={'model.backbone.pretrained': 'intern_vit_tiny_224px.pth'},
        parameters={'model.decode_head.with_norm': {'grid': [False, True]}},
        derived={'iterations': {'at_full_data': 4}, 'warmup': {'ratio': 0.5}, 'evaluations': 1},
        fewshot={'seed': 7}, resources={'workers_per_trial': 1, 'cpus_per_worker': 1},
        output=str(tmp_path / 'out'))
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(space))
    assert cli.main(['sweep', 'space.yaml', '--address', ray_address]) == 0
    client = MlflowClient('sqlite:///' + str(tmp_path / 'out' / 'mlflow.db'))
    runs = client.search_runs([client.get_experiment_by_name('internvl').experiment_id])
    children = [r for r in runs if 'mlflow.parentRunId' in r.data.tags]
    assert len(children) == 2
    for child in children:
        assert child.data.params['fewshot.seed'] == '7'
        assert child.data.params['lr_config.warmup_iters'] == '2'
        assert child.data.tags['trial_group_size'] == '2'
        assert 0.0 <= child.data.metrics['mIoU'] <= 1.0
        # each head carries half of what the group cost (1 CPU worker: worker-hours = wall / 2)
        assert child.data.metrics['cost.worker_hours'] == pytest.approx(
            child.data.metrics['cost.train_s'] / 3600 / 2)
    logs = '\n'.join(p.read_text() for p in (tmp_path / 'out' / 'internvl').rglob('*.log'))
    assert f'InternViT weights {tmp_path / "intern_vit_tiny_224px.pth"} (internvl layout)' in logs


@pytest.mark.parametrize('lr', [1e-9, 1e-3])
def test_a_fine_tuned_bf16_backbone_says_how_much_of_it_changed(lr, ade150, tmp_path):
    """InternVL's few-shot protocol trains the backbone in bfloat16 with AdamW and no float32
    master weights. Every evaluation carries the fraction of the backbone's trainable weights
    that changed since the previous one (in this small model the sample is every weight):
    checked here against the weights themselves, from the file and from the checkpoint; at
    lr 1e-9 the updates round away and the run warns."""
    from orchestrator import worker
    weights = _tiny_vit_file(tmp_path / 'vit.pth', depth=4)
    cfg = _family('few_shot_1of4', ade150, **{'model.backbone.pretrained': str(weights),
                                              'optimizer.lr': lr})
    seen = []
    with pytest.warns(UserWarning, match='DeepSpeed'):
        worker.train(cfg, str(tmp_path / 'work'), callback=seen.append)
    assert [m['iter'] for m in seen] == [2]  # one evaluation: its interval is the whole run
    model = worker.build_model(cfg)  # the file loaded (its pos_embed resized), as trained
    before = {n: p.detach().bfloat16() for n, p in model.backbone.named_parameters()
              if p.requires_grad}
    after = torch.load(tmp_path / 'work' / 'iter_2.pth', map_location='cpu',
                       weights_only=False)['state_dict']
    changed = sum(int((after[f'backbone.{n}'] != v).sum()) for n, v in before.items())
    total = sum(v.numel() for v in before.values())
    assert seen[0]['backbone.changed_fraction'] == changed / total
    log = next((tmp_path / 'work').glob('*.log')).read_text()
    warned = 'of the backbone\'s trainable weights changed' in log
    assert warned == (changed / total < 0.01)
    assert warned == (lr == 1e-9)  # the two runs tell the cases apart


def test_float32_master_weights_from_the_space_file_reach_the_fine_tuned_backbone(ade150,
                                                                                 tmp_path):
    """``fine_tuning.float32_master_weights: true`` in a space file over InternVL's few-shot
    config: the trial's config trains with its layer-decay groups kept, and the checkpoint
    holds a float32 master per trainable bfloat16 weight, each rounding to the weight saved."""
    import yaml

    from orchestrator import worker
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    from orchestrator.trial_config import trial_config
    weights = _tiny_vit_file(tmp_path / 'vit.pth', depth=4)
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(dict(
        name='masters', base_config=str(FAMILIES / 'few_shot_1of4.py'), data_root=str(ade150),
        overrides={'model.backbone.pretrained': str(weights)},
        parameters={'optimizer.lr': {'grid': [4e-5]}},
        fine_tuning={'float32_master_weights': True})))
    spec, base_cfg = load_spec(tmp_path / 'space.yaml')
    plan = make_plan(spec, base_cfg)
    (trial,) = plan.trials
    cfg = trial_config(plan.base, base_cfg.filename, trial)
    assert trial.derived['fine_tuning.float32_master_weights'] is True  # recorded on the child run
    with pytest.warns(UserWarning, match='DeepSpeed'):
        worker.train(cfg, str(tmp_path / 'work'))
    saved = torch.load(tmp_path / 'work' / 'iter_2.pth', map_location='cpu', weights_only=False)
    state, optimizer = saved['state_dict'], saved['optimizer']
    names = [g['name'] for g in optimizer['param_groups']]
    # layer decay (num_layers=4) still scales the groups: the embedding, 4 blocks, the head
    assert len({g['lr_scale'] for g in optimizer['param_groups']}) == 6
    low = [n for n in names if state[n].dtype == torch.bfloat16]
    masters = optimizer['float32_master']
    assert len(masters) == len(low) and all(m.dtype == torch.float32 for m in masters)
    for name, master in zip(low, masters):
        assert torch.equal(master.bfloat16(), state[name]), name
    assert any(not torch.equal(m, state[n].float()) for n, m in zip(low, masters))
