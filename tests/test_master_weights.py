"""Float32 master weights for a bfloat16 backbone (mmseg_custom/optimizers/master_weights.py),
checked against torch's own AdamW on float32 tensors fed the same gradients."""
import copy

import pytest
import torch
import torch.nn as nn
from mmcv.runner import build_optimizer

import mmseg_custom  # noqa: F401  (registers the constructors)
from mmseg_custom.optimizers.master_weights import STATE_KEY
from orchestrator.fine_tuning import wrapped as wrap

LR, WD = 1e-5, 0.05  # an update of ~1e-5 is below half a bfloat16 step of weights near 0.02


class Tiny(nn.Module):
    """A segmentor's shape: a bfloat16 backbone (a frozen embedding, two blocks), a float32 head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Module()
        self.backbone.patch_embed = nn.Linear(8, 8)
        self.backbone.patch_embed.requires_grad_(False)
        self.backbone.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        for p in self.backbone.parameters():
            nn.init.normal_(p, std=0.02)
        self.backbone.to(torch.bfloat16)
        self.decode_head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.backbone.patch_embed(x.bfloat16())
        for block in self.backbone.blocks:
            h = h + block(h)
        return self.decode_head(h.float())


def _inputs(steps):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=g) for _ in range(steps)]


def _step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads


CFG = dict(type='AdamW', lr=LR, weight_decay=WD)


def test_the_masters_are_what_float32_adamw_makes_of_the_same_gradients():
    model = Tiny()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, wrap(CFG))
    reference = {n: v.float().requires_grad_() for n, v in start.items()
                 if model.get_parameter(n).requires_grad}
    torch_adamw = torch.optim.AdamW(list(reference.values()), lr=LR, weight_decay=WD)
    for x in _inputs(5):
        grads = _step(model, optimizer, x)
        for n, ref in reference.items():
            ref.grad = grads[n].float()
        torch_adamw.step()
    masters = {id(p): m for p, m in optimizer.master_pairs}
    for n, ref in reference.items():
        p = model.get_parameter(n)
        if p.dtype == torch.bfloat16:
            assert torch.equal(masters[id(p)], ref.detach())
            assert torch.equal(p.detach(), ref.detach().bfloat16())
        else:  # the float32 head trains as it always did
            assert torch.equal(p.detach(), ref.detach())
    assert torch.equal(model.backbone.patch_embed.weight, start['backbone.patch_embed.weight'])
    # the point of it: without masters, bfloat16 AdamW is not float32 AdamW rounded (updates
    # below half a step of a weight round away; here the larger weights never move)
    plain = Tiny()
    plain_optimizer = build_optimizer(plain, CFG)
    for x in _inputs(5):
        _step(plain, plain_optimizer, x)
    name = 'backbone.blocks.0.weight'
    exact = reference[name].detach().bfloat16()
    assert not torch.equal(plain.get_parameter(name), exact)
    large = start[name].abs() > 0.02
    assert torch.equal(plain.get_parameter(name)[large], start[name][large])


def _masters(model, optimizer):
    """{parameter name: its float32 master}."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: m.detach().clone() for p, m in optimizer.master_pairs}


@pytest.mark.parametrize('saved_with_masters', [True, False])
def test_a_resume_continues_from_the_masters_not_the_rounded_weights(saved_with_masters,
                                                                     tmp_path):
    """Five steps straight equal three, a checkpoint through a file, and two more. A checkpoint
    of a run without masters starts them from its (rounded) weights."""
    straight = Tiny()
    opt = build_optimizer(straight, wrap(CFG))
    for x in _inputs(5):
        _step(straight, opt, x)
    straight_masters = _masters(straight, opt)

    first = Tiny()
    opt = build_optimizer(first, wrap(CFG) if saved_with_masters else CFG)
    for x in _inputs(5)[:3]:
        _step(first, opt, x)
    torch.save(dict(state_dict=first.state_dict(), optimizer=opt.state_dict()),
               tmp_path / 'iter_3.pth')
    saved = torch.load(tmp_path / 'iter_3.pth', weights_only=False)
    assert (STATE_KEY in saved['optimizer']) == saved_with_masters

    resumed = Tiny()
    opt = build_optimizer(resumed, wrap(CFG))
    resumed.load_state_dict(saved['state_dict'])  # mmcv's resume: the model, then the optimizer
    opt.load_state_dict(saved['optimizer'])
    if not saved_with_masters:
        for name, master in _masters(resumed, opt).items():
            assert torch.equal(master, saved['state_dict'][name].float())
        return
    for x in _inputs(5)[3:]:
        _step(resumed, opt, x)
    resumed_masters = _masters(resumed, opt)
    assert resumed_masters.keys() == straight_masters.keys() and len(resumed_masters) == 4
    for name, master in straight_masters.items():
        assert torch.equal(resumed_masters[name], master)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_it_wraps_the_layer_decay_constructor_without_changing_its_groups():
    """The wrapped constructor's groups (names, learning rates, weight decays) are the inner
    one's as built alone; only the trainable bfloat16 parameters are replaced, by float32
    copies of equal value; the frozen embedding is not copied."""
    cfg = dict(CFG, constructor='CustomLayerDecayOptimizerConstructor',
               paramwise_cfg=dict(num_layers=2, layer_decay_rate=0.5))
    alone = build_optimizer(Tiny(), cfg)
    model = Tiny()
    wrapped = build_optimizer(model, wrap(cfg))
    strip = [{k: v for k, v in g.items() if k != 'params'} for g in alone.param_groups]
    assert [{k: v for k, v in g.items() if k != 'params'} for g in wrapped.param_groups] == strip
    by_name = dict(model.named_parameters())
    for group in wrapped.param_groups:
        (param,) = group['params']
        own = by_name[group['name']]
        assert param.dtype == torch.float32
        assert torch.equal(param.detach(), own.detach().float())
        assert (param is own) == (own.dtype == torch.float32)
    assert 'backbone.patch_embed.weight' not in {g['name'] for g in wrapped.param_groups}
    assert wrap(wrap(cfg)) == wrap(cfg)
    assert copy.deepcopy(cfg) == cfg  # wrap leaves the config it is given alone


@pytest.mark.parametrize('masters', [False, True])
def test_the_planned_bytes_per_rank_are_what_a_step_leaves_held(masters):
    """fine_tuning.rank_bytes of the tiny InternVL few-shot model, its parameters counted on the
    meta device, against the tensors one real step on CPU leaves held (weights, gradients,
    optimizer state, masters; each storage once; Adam's scalar step counters aside)."""
    from mmcv import Config
    from mmseg.models import build_segmentor

    from orchestrator.fine_tuning import rank_bytes, trainable
    cfg = Config.fromfile('configs/internvl_tiny/few_shot_1of4.py')
    cfg.model.backbone.pretrained = None
    optimizer_cfg = cfg._cfg_dict.to_dict()['optimizer']
    model = build_segmentor(cfg.model)
    optimizer = build_optimizer(model, wrap(optimizer_cfg) if masters else optimizer_cfg)
    optimizer.zero_grad()
    sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad).backward()
    optimizer.step()
    held = {}

    def add(t):
        if t is not None:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for p in model.parameters():
        if p.requires_grad:
            add(p)
            add(p.grad)
    for group in optimizer.param_groups:
        for p in group['params']:
            add(p)
            add(p.grad)
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != 'step':
                add(value)
    low = [p for p in model.parameters() if p.requires_grad and p.dtype == torch.bfloat16]
    assert len(low) > 10  # the backbone trains in bfloat16 (what the plan is about)
    planned = rank_bytes(trainable(cfg._cfg_dict.to_dict()['model']), optimizer_cfg, masters)
    assert sum(held.values()) == planned


def test_weights_loaded_after_the_optimizer_was_built_are_the_ones_trained():
    """mmseg builds the optimizer before ``load_from`` loads the weights: the masters follow
    the loaded weights, not the ones they were copied from."""
    model = Tiny()
    optimizer = build_optimizer(model, wrap(CFG))
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()})  # load_from
    loaded = {n: p.detach().float().clone() for n, p in model.named_parameters()
              if p.requires_grad and p.dtype == torch.bfloat16}
    grads = _step(model, optimizer, _inputs(1)[0])
    reference = {n: v.requires_grad_() for n, v in loaded.items()}
    torch_adamw = torch.optim.AdamW(list(reference.values()), lr=LR, weight_decay=WD)
    for n, ref in reference.items():
        ref.grad = grads[n].float()
    torch_adamw.step()
    masters = _masters(model, optimizer)
    for n, ref in reference.items():
        assert torch.equal(masters[n], ref.detach()), n
        assert torch.equal(model.get_parameter(n).detach(), ref.detach().bfloat16()), n
