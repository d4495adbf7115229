"""Few-shot subsets (mmseg_custom's FewShotSubset wrapper): round(f*N) images, the same in every
process, nested across fractions, and the images InternVL's max_image_num keeps for a count."""
import subprocess
import sys

import pytest

from mmseg_custom.datasets.fewshot_subset import FewShotSubset

NAMES = [f'ADE_train_{i:08d}' for i in range(1, 201)]
FRACTIONS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


class _Listed:
    """A built dataset's surface, as the wrapper reads it: its images and classes."""
    CLASSES, PALETTE, img_suffix = ('a', 'b'), None, '.jpg'

    def __init__(self, names):
        self.img_infos = [dict(filename=n + '.jpg') for n in names]

    def __len__(self):
        return len(self.img_infos)


def kept(names, fraction, seed=0):
    return FewShotSubset(_Listed(names), fraction, seed).names


def _ade(root, **extra):
    return dict(type='ADELayoutDataset', num_classes=4, data_root=str(root),
                img_dir='images/training', ann_dir='annotations/training', pipeline=[], **extra)


def test_size_is_round_f_times_n():
    """1/16 of 200 is 12.5: 12 (rounded half to even, as the sweeps have always kept)."""
    sizes = []
    for f in FRACTIONS:
        subset = FewShotSubset(_Listed(NAMES), f)
        assert len(subset) == len(subset.dataset.img_infos)
        sizes.append(len(subset))
    assert sizes == [12, 25, 50, 100, 200]


def test_the_subsets_are_those_earlier_sweeps_kept():
    """The first images of 1/16 for seeds 0 and 1, as orchestrator/fewshot.py kept them
    before the rule moved into FewShotSubset (read off that code at 00e4bc5): a sweep resumed
    or repeated now trains on the same images."""
    assert kept(NAMES, 1 / 16, seed=0)[:6] == [
        'ADE_train_00000106', 'ADE_train_00000007', 'ADE_train_00000169',
        'ADE_train_00000091', 'ADE_train_00000066', 'ADE_train_00000160']
    assert kept(NAMES, 1 / 16, seed=1)[:6] == [
        'ADE_train_00000082', 'ADE_train_00000122', 'ADE_train_00000064',
        'ADE_train_00000032', 'ADE_train_00000089', 'ADE_train_00000060']


def test_nested_across_fractions():
    subsets = [set(kept(NAMES, f, seed=3)) for f in FRACTIONS]
    for small, large in zip(subsets, subsets[1:]):
        assert small < large
    assert subsets[-1] == set(NAMES)


def test_independent_of_listing_order_and_seeded():
    assert kept(list(reversed(NAMES)), 0.25, seed=1) == kept(NAMES, 0.25, seed=1)
    assert set(kept(NAMES, 0.25, seed=1)) != set(kept(NAMES, 0.25, seed=2))
    assert kept(NAMES, 0.25)[:5] != sorted(NAMES)[:5]  # a permutation, not a prefix


def test_same_subset_in_another_process_and_recorded(synthetic_root, tmp_path):
    """Built through mmseg's registry here and in a fresh process: the same names, in the same
    order; the record file holds them (a split file's format)."""
    from mmseg.datasets import build_dataset

    import mmseg_custom  # noqa: F401
    record = tmp_path / 'kept.txt'
    here = build_dataset(dict(type='FewShotSubset', dataset=_ade(synthetic_root), fraction=0.25,
                              seed=0, record=str(record)))
    names = [i['filename'][:-4] for i in here.dataset.img_infos]
    code = ('import sys, mmseg_custom; from mmseg.datasets import build_dataset; '
            f'd = build_dataset(dict(type="FewShotSubset", dataset={_ade(synthetic_root)!r}, '
            'fraction=0.25, seed=0)); print(" ".join(i["filename"][:-4] '
            'for i in d.dataset.img_infos))')
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert run.stdout.split() == names and len(names) == round(0.25 * 48)
    assert record.read_text().split() == names
    assert len(here) == 12 and here[3]['img_info']['filename'] == names[3] + '.jpg'  # in order


@pytest.mark.parametrize('bad', [0, -0.5, 1.01])
def test_fraction_outside_unit_interval_rejected(bad):
    with pytest.raises(ValueError, match=r'\(0, 1\]'):
        kept(NAMES, bad)


def test_max_image_num_keeps_the_images_a_fraction_keeps(synthetic_root):
    """InternVL's count and the sweeps' fraction, built as mmseg builds each: the same images
    in the same order, for every seed and count."""
    from mmseg.datasets import build_dataset

    import mmseg_custom  # noqa: F401
    for seed in (0, 3):
        for keep in (1, 5, 47):
            counted = build_dataset(_ade(synthetic_root, max_image_num=keep, subset_seed=seed))
            cut = build_dataset(dict(type='FewShotSubset', dataset=_ade(synthetic_root),
                                     fraction=keep / 48, seed=seed))
            assert [i['filename'] for i in counted.img_infos] == \
                [i['filename'] for i in cut.dataset.img_infos]


def test_max_image_num_and_fractions_sort_the_names_a_split_file_holds():
    """With their suffix, 'x-1.jpg' sorts before 'x.jpg'; without, 'x' before 'x-1': both
    must permute the names without suffix (the kept lists, per seed, as orchestrator/fewshot.py
    kept them at 00e4bc5), or the count and the fraction keep other images."""
    from mmseg_custom.datasets.max_image_num import MaxImageNumMixin
    names = ['x', 'x-1', 'x0', 'y', 'y-2', 'y_3', 'z', 'z,4']
    expected = {0: ['x0', 'y-2', 'y'], 1: ['y_3', 'x', 'x-1'], 2: ['z', 'y_3', 'z,4'],
                3: ['z', 'z,4', 'x0']}
    for seed, names_kept in expected.items():
        dataset = MaxImageNumMixin()
        dataset.img_suffix = '.jpg'
        dataset.img_infos = [dict(filename=n + '.jpg') for n in reversed(names)]
        dataset._keep(3, seed)
        assert [i['filename'][:-4] for i in dataset.img_infos] == names_kept
        assert kept(names, 3 / len(names), seed) == names_kept


def test_mmseg_custom_loads_without_the_orchestrator():
    """A best.py config's custom_imports need mmseg_custom alone."""
    code = ("import sys; sys.modules['orchestrator'] = None; import mmseg_custom; "
            "from mmseg.datasets import DATASETS; print(DATASETS.get('ADE20KDataset').__module__,"
            " DATASETS.get('FewShotSubset').__module__)")
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ['mmseg_custom.datasets.max_image_num',
                                  'mmseg_custom.datasets.fewshot_subset']
