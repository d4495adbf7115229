"""Few-shot subsets: round(f*N) images, the same in every process, nested across fractions."""
import subprocess
import sys

import pytest

from orchestrator.fewshot import fewshot_subset, list_images, write_split_file

NAMES = [f'ADE_train_{i:08d}' for i in range(1, 201)]
FRACTIONS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def test_size_is_round_f_times_n():
    for f in FRACTIONS:
        assert len(fewshot_subset(NAMES, f)) == round(f * len(NAMES))


def test_nested_across_fractions():
    subsets = [set(fewshot_subset(NAMES, f, seed=3)) for f in FRACTIONS]
    for small, large in zip(subsets, subsets[1:]):
        assert small < large
    assert subsets[-1] == set(NAMES)


def test_independent_of_listing_order_and_seeded():
    shuffled = list(reversed(NAMES))
    assert fewshot_subset(shuffled, 0.25, seed=1) == fewshot_subset(NAMES, 0.25, seed=1)
    assert set(fewshot_subset(NAMES, 0.25, seed=1)) != set(fewshot_subset(NAMES, 0.25, seed=2))
    assert fewshot_subset(NAMES, 0.25)[:5] != sorted(NAMES)[:5]  # a permutation, not a prefix


def test_same_subset_in_another_process(synthetic_root, tmp_path):
    img_dir = synthetic_root / 'images' / 'training'
    here = write_split_file(img_dir, 0.25, tmp_path / 'a.txt', seed=0)
    code = ('import sys; from orchestrator.fewshot import write_split_file; '
            'write_split_file(sys.argv[1], 0.25, sys.argv[2], seed=0)')
    subprocess.run([sys.executable, '-c', code, str(img_dir), str(tmp_path / 'b.txt')], check=True)
    there = (tmp_path / 'b.txt').read_text().split()
    assert here == there and len(here) == round(0.25 * len(list_images(img_dir)))


@pytest.mark.parametrize('bad', [0, -0.5, 1.01])
def test_fraction_outside_unit_interval_rejected(bad):
    with pytest.raises(ValueError, match=r'\(0, 1\]'):
        fewshot_subset(NAMES, bad)


def test_max_image_num_keeps_the_images_a_fraction_keeps():
    """mmseg_custom's copy of the rule (it must load without the orchestrator) agrees with it."""
    from mmseg_custom.datasets.max_image_num import seeded_prefix
    for seed in (0, 3):
        for keep in (1, 5, len(NAMES)):
            assert seeded_prefix(reversed(NAMES), keep, seed) == \
                fewshot_subset(NAMES, keep / len(NAMES), seed)


def test_max_image_num_sorts_the_names_a_split_file_holds():
    """With their suffix, 'x-1.jpg' sorts before 'x.jpg'; without, 'x' before 'x-1': the
    dataset must permute the names the sweeps' subsets permute, or the two keep other images."""
    from mmseg_custom.datasets.max_image_num import MaxImageNumMixin
    names = ['x', 'x-1', 'x0', 'y', 'y-2', 'y_3', 'z', 'z,4']
    for seed in range(4):
        dataset = MaxImageNumMixin()
        dataset.img_suffix = '.jpg'
        dataset.img_infos = [dict(filename=n + '.jpg') for n in names]
        dataset._keep(3, seed)
        assert [i['filename'][:-4] for i in dataset.img_infos] == \
            fewshot_subset(names, 3 / len(names), seed)


def test_mmseg_custom_loads_without_the_orchestrator():
    """A best.py config's custom_imports need mmseg_custom alone."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['orchestrator'] = None; import mmseg_custom; "
            "from mmseg.datasets import DATASETS; print(DATASETS.get('ADE20KDataset').__module__)")
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith('max_image_num')
