"""Generated data: ADE20K layout, deterministic, a real signal, readable by mmseg."""
import hashlib

import numpy as np
from PIL import Image

from mmseg.datasets import build_dataset
from mmseg_custom.datasets.synthetic import generate_ade_layout


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob('*')):
        if p.is_file() and p.name != 'meta.json':
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_counts_and_labels(tmp_path):
    root = generate_ade_layout(tmp_path / 'd', num_classes=5, num_train=6, num_val=3, size=32, seed=3)
    for split, n in (('training', 6), ('validation', 3)):
        imgs = sorted((root / 'images' / split).glob('*.jpg'))
        anns = sorted((root / 'annotations' / split).glob('*.png'))
        assert len(imgs) == n and [p.stem for p in imgs] == [p.stem for p in anns]
    labels = np.concatenate([np.array(Image.open(p)).ravel()
                             for p in (root / 'annotations').rglob('*.png')])
    assert labels.max() <= 5 and 0 in labels and 1 in labels  # 0 = ignore band, 1 = background
    assert len(set(labels.tolist()) - {0, 1}) >= 2  # shapes of several classes
    img = np.array(Image.open(next((root / 'images' / 'training').glob('*.jpg'))))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate_ade_layout(tmp_path / 'a', num_train=4, num_val=2, size=32, seed=7)
    b = generate_ade_layout(tmp_path / 'b', num_train=4, num_val=2, size=32, seed=7)
    c = generate_ade_layout(tmp_path / 'c', num_train=4, num_val=2, size=32, seed=8)
    assert _digest(a) == _digest(b) != _digest(c)


def test_classes_carry_a_colour_signal(synthetic_root):
    """Mean colour per class differs: a model can learn it, so mIoU measures learning."""
    sums, counts = {}, {}
    for ann in sorted((synthetic_root / 'annotations' / 'training').glob('*.png'))[:20]:
        label = np.array(Image.open(ann))
        img = np.array(Image.open(synthetic_root / 'images' / 'training' / (ann.stem + '.jpg')))
        for k in range(1, 5):
            m = label == k
            sums[k] = sums.get(k, 0) + img[m].astype(float).sum(0)
            counts[k] = counts.get(k, 0) + m.sum()
    means = np.array([sums[k] / counts[k] for k in range(1, 5)])
    gaps = [np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 15


def test_ade_layout_dataset_reads_k_classes(tiny_cfg):
    ds = build_dataset(tiny_cfg.data.train)
    assert len(ds) == 48 and ds.CLASSES == ('class1', 'class2', 'class3', 'class4')
    sample = ds[0]
    seg = sample['gt_semantic_seg'].data.numpy()
    assert set(np.unique(seg)) <= {0, 1, 2, 3, 255}  # reduce_zero_label: 0 -> 255, k -> k-1
    assert 255 in seg
