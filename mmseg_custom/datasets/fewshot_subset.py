"""Few-shot training subsets, as an mmseg dataset wrapper (like mmseg's ``RepeatDataset``):

    data = dict(train=dict(type='FewShotSubset', fraction=0.25, seed=0,
                           dataset=dict(type='ADE20KDataset', data_root=..., ...)))

keeps ``round(fraction * N)`` of the wrapped dataset's N images (at least one): the first of a
seeded permutation of their sorted names (file names less the image suffix). The same on every
rank, process and run; for one seed a smaller fraction's images are a prefix of a larger one's
(1/16 inside 1/8 inside ...); another seed, another subset. This is the one place of the rule:
sweeps, ``orchestrator train`` and an exported best config (under mmseg's own tools/train.py,
through ``custom_imports``) all build this type. InternVL's ``max_image_num`` (max_image_num.py)
keeps a count by the same rule.
"""
import hashlib
import os

import numpy as np
from mmcv.runner import get_dist_info
from mmseg.datasets.builder import DATASETS, build_dataset


def seeded_prefix(names, keep, seed=0):
    """The first ``keep`` names of the seeded permutation of the sorted names."""
    names = sorted(names)
    return [names[i] for i in np.random.default_rng(seed).permutation(len(names))[:keep]]


def image_names(dataset):
    """{name: img_info}: each image by the name a split file holds (its file name less the
    suffix). Sorted by these names: with the suffix, 'x-1.jpg' < 'x.jpg' but 'x' < 'x-1',
    another permutation."""
    suffix = getattr(dataset, 'img_suffix', '')
    return {info['filename'][:len(info['filename']) - len(suffix)]
            if suffix and info['filename'].endswith(suffix) else info['filename']: info
            for info in dataset.img_infos}


def digest(names):
    """The sha256 of a subset's names in kept order (what ``names_sha256`` pins)."""
    return hashlib.sha256('\n'.join(names).encode()).hexdigest()


def kept_count(fraction, n):
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'few-shot fraction must be in (0, 1], got {fraction!r}')
    return max(1, int(round(fraction * n))) if n else 0


@DATASETS.register_module()
class FewShotSubset:
    """The seeded ``fraction`` of ``dataset``'s images (module docstring); ``record``: a file
    (or a list of files) that rank 0 writes the kept names to, one per line in kept order (a
    split file's format); ``names_sha256``: the kept names' digest (names_sha256) the subset
    must have (``digest``), so that a config exported from a sweep refuses a directory whose
    images changed since rather than train on another subset."""

    def __init__(self, dataset, fraction, seed=0, record=None, names_sha256=None):
        self.dataset = build_dataset(dataset) if isinstance(dataset, dict) else dataset
        by_name = image_names(self.dataset)
        kept = seeded_prefix(list(by_name), kept_count(fraction, len(by_name)), seed)
        if names_sha256 is not None and digest(kept) != names_sha256:
            raise ValueError(f'FewShotSubset: the {len(kept)} images kept of {len(by_name)} '
                             f'(fraction {fraction}, seed {seed}) are not the ones recorded '
                             '(names_sha256): the training images changed since')
        self.dataset.img_infos = [by_name[n] for n in kept]
        self.fraction, self.seed, self.names = fraction, seed, kept
        self.CLASSES, self.PALETTE = self.dataset.CLASSES, self.dataset.PALETTE
        if get_dist_info()[0] == 0:
            for path in filter(None, [record] if isinstance(record, str) else record or []):
                tmp = f'{path}.tmp.{os.getpid()}'
                with open(tmp, 'w') as f:
                    f.write('\n'.join(kept) + '\n')
                os.replace(tmp, path)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return self.dataset[idx]

    def __getattr__(self, name):  # what mmseg asks of a dataset beyond items (its flags, ...)
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)
