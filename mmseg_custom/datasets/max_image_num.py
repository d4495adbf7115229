"""InternVL's ``max_image_num`` dataset option, kept deterministic.

InternVL's few-shot configs set ``max_image_num`` on the training set and pick that many images
with an unseeded ``random.shuffle`` in every process: each rank and each run trains on another
subset. Here the kept images are the first ``max_image_num`` of the same seeded permutation of
the sorted file list that the sweeps' few-shot fractions use (orchestrator/fewshot.py), so the
subset is the same everywhere and smaller subsets are inside larger ones.
"""
from mmseg.datasets.ade import ADE20KDataset as MMSegADE20KDataset
from mmseg.datasets.builder import DATASETS

from orchestrator.fewshot import seeded_prefix


class MaxImageNumMixin:

    def _keep(self, max_image_num, seed):
        if max_image_num is None or max_image_num >= len(self.img_infos):
            return
        if not isinstance(max_image_num, int) or max_image_num < 1:
            raise ValueError(f'max_image_num must be a positive integer, got {max_image_num!r}')
        by_name = {info['filename']: info for info in self.img_infos}
        self.img_infos = [by_name[n] for n in seeded_prefix(list(by_name), max_image_num, seed)]


@DATASETS.register_module(force=True)
class ADE20KDataset(MaxImageNumMixin, MMSegADE20KDataset):
    """mmseg's ADE20KDataset plus ``max_image_num`` (force-registered under its name)."""

    def __init__(self, max_image_num=None, subset_seed=0, **kwargs):
        super().__init__(**kwargs)
        self._keep(max_image_num, subset_seed)
