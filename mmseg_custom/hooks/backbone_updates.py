"""How much of a fine-tuned backbone an optimizer step really changes.

InternVL's few-shot protocol trains the backbone in bfloat16 with AdamW and no float32 master
weights: an update smaller than half a bfloat16 step of the weight rounds away
(``bf16(0.02) + 4e-5 == 0.02``), so with a small learning rate most weights never move. Every
evaluation of such a run carries ``backbone.changed_fraction``: the fraction of the backbone's
trainable weights that changed since the previous evaluation (the start, for the first),
counted on a fixed seeded sample of SAMPLE elements (all of them in a small model), and the run
warns when it is below WARN_BELOW.
"""
import torch

SAMPLE = 1 << 20  # elements; sampling error of a fraction p: sqrt(p (1 - p) / SAMPLE) <= 0.05 %
WARN_BELOW = 0.01


def _trainable(model):
    model = getattr(model, 'module', model)
    backbone = getattr(model, 'backbone', None)
    if backbone is None:
        return []
    return [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]


class BackboneUpdates:
    """The sample's values at the previous evaluation, and what changed since."""

    def __init__(self, seed=0):
        self.seed = seed
        self.where = None  # [(parameter name, flat indices)] of the sample
        self.previous = None
        self.warned = False

    def start(self, model):
        params = _trainable(model)
        self.where, self.previous = None, None
        if not params:  # a frozen backbone: nothing to count
            return
        sizes = torch.tensor([p.numel() for _, p in params])
        total = int(sizes.sum())
        if total <= SAMPLE:
            picked = torch.arange(total)
        else:  # drawn with replacement, duplicates dropped (a permutation of 5.9 B would not fit)
            generator = torch.Generator().manual_seed(self.seed)
            picked = torch.unique(torch.randint(0, total, (SAMPLE,), generator=generator))
        bounds = torch.cumsum(sizes, 0)
        owner = torch.searchsorted(bounds, picked, right=True)
        self.where = []
        for i, (name, _) in enumerate(params):
            mine = picked[owner == i] - (bounds[i] - sizes[i])
            if len(mine):
                self.where.append((name, mine))
        self.previous = self._values(model)

    def _values(self, model):
        params = dict(_trainable(model))
        return [params[name].detach().reshape(-1)[idx.to(params[name].device)].clone()
                for name, idx in self.where]

    def changed_fraction(self, model):
        """The fraction of the sample that changed since the previous call (or the start);
        None for a frozen backbone."""
        if self.where is None:
            return None
        now = self._values(model)
        changed = sum(int((a != b).sum()) for a, b in zip(now, self.previous))
        self.previous = now
        return changed / sum(len(v) for v in now)

    def warning(self, fraction, iteration, model):
        """One warning per run when the fraction is small, or None."""
        if self.warned or fraction is None or fraction >= WARN_BELOW:
            return None
        self.warned = True
        dtype = _trainable(model)[0][1].dtype
        return (f'only {fraction:.2%} of the backbone\'s trainable weights changed in the '
                f'evaluation interval ending at iteration {iteration} ({dtype} weights'
                + (': updates below half a bfloat16 step round away; a larger learning rate, '
                   'or float32 master weights (fine_tuning.float32_master_weights in a space '
                   'file, the Float32MasterWeights optimizer constructor in a config), would '
                   'keep them)' if dtype == torch.bfloat16
                   else ')'))
