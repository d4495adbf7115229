"""InternVL's ``max_image_num`` dataset option, kept deterministic.

InternVL's ``ADE20KDataset`` keeps ``max_image_num`` training images after a ``random.shuffle``
seeded by the run's seed: each seed trains on another subset, the same on every rank. Here the
kept images are the first ``max_image_num`` of the seeded permutation that few-shot fractions
use (fewshot_subset.py, the one place of the rule), with ``subset_seed`` (the run's ``seed`` when
the worker builds it, orchestrator/worker.py): the same dependence on the seed, the same on
every rank, and nested across sizes for one seed.
"""
from mmseg.datasets.ade import ADE20KDataset as MMSegADE20KDataset
from mmseg.datasets.builder import DATASETS

from .fewshot_subset import image_names, seeded_prefix


class MaxImageNumMixin:

    def _keep(self, max_image_num, seed):
        if max_image_num is None or max_image_num >= len(self.img_infos):
            return
        if not isinstance(max_image_num, int) or max_image_num < 1:
            raise ValueError(f'max_image_num must be a positive integer, got {max_image_num!r}')
        by_name = image_names(self)
        self.img_infos = [by_name[n] for n in seeded_prefix(list(by_name), max_image_num, seed)]


@DATASETS.register_module(force=True)
class ADE20KDataset(MaxImageNumMixin, MMSegADE20KDataset):
    """mmseg's ADE20KDataset plus ``max_image_num`` (force-registered under its name)."""

    def __init__(self, max_image_num=None, subset_seed=0, **kwargs):
        super().__init__(**kwargs)
        self._keep(max_image_num, subset_seed)
