"""Generated segmentation data in ADE20K's layout, with a signal a model can learn.

Layout (as ADEChallengeData2016): ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png``; label 0 = ignore (a thin band around every shape,
like ADE's unlabeled pixels), classes are 1..K. Class 1 is the background; classes 2..K are
ellipses and rectangles. Each class has its own colour and stripe texture, and odd-even class
pairs share a hue, so colour alone does not separate every class: context (convs, kernel size)
pays off, which makes head variants differ measurably.
"""
import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = {'training': 'num_train', 'validation': 'num_val'}


def _class_style(num_classes):
    """(rgb, stripe angle, stripe period) per class 1..K, deterministic."""
    styles = {}
    for k in range(1, num_classes + 1):
        hue = ((k - 1) // 2) / max(1, (num_classes + 1) // 2)
        value = 0.85 if k % 2 else 0.6
        rgb = np.array(colorsys.hsv_to_rgb(hue, 0.75, value)) * 255.0
        styles[k] = (rgb, np.pi * k / (num_classes + 1), 3.0 + 2.0 * (k % 3))
    return styles


def _render(rng, size, num_classes, styles):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    label = np.ones((size, size), np.uint8)  # background class 1
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(2, num_classes + 1)) if num_classes > 1 else 1
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        ry, rx = rng.uniform(0.1, 0.3, 2) * size
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            border = ((yy - cy) / (ry + 1.5)) ** 2 + ((xx - cx) / (rx + 1.5)) ** 2 <= 1.0
        else:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            border = (np.abs(yy - cy) <= ry + 1.5) & (np.abs(xx - cx) <= rx + 1.5)
        label[border] = 0
        label[inside] = k
    img = np.zeros((size, size, 3), np.float32)
    for k, (rgb, angle, period) in styles.items():
        mask = label == k
        if not mask.any():
            continue
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        img[mask] = rgb[None, :] * (1.0 + 0.25 * stripes[mask, None])
    img[label == 0] = 128.0
    img += rng.normal(0.0, 18.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def generate_ade_layout(root, num_classes=4, num_train=48, num_val=16, size=64, seed=0):
    """Write a dataset under ``root`` (idempotent: kept when its meta.json matches).

    Returns the root as a Path. Same arguments, same bytes: images depend only on ``seed``.
    """
    if num_classes < 1 or num_train < 1 or num_val < 1 or size < 16:
        raise ValueError(f'generate_ade_layout needs num_classes>=1, num_train>=1, num_val>=1, '
                         f'size>=16; got {num_classes}, {num_train}, {num_val}, {size}')
    root = Path(root)
    meta = dict(num_classes=num_classes, num_train=num_train, num_val=num_val, size=size, seed=seed)
    meta_file = root / 'meta.json'
    if meta_file.exists() and json.loads(meta_file.read_text()) == meta:
        return root
    styles = _class_style(num_classes)
    for split, count_key in SPLITS.items():
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, list(SPLITS).index(split)])
        for i in range(meta[count_key]):
            img, label = _render(rng, size, num_classes, styles)
            name = f'{split}_{i:05d}'
            Image.fromarray(img).save(root / 'images' / split / f'{name}.jpg', quality=95)
            Image.fromarray(label).save(root / 'annotations' / split / f'{name}.png')
    meta_file.write_text(json.dumps(meta))
    return root


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=generate_ade_layout.__doc__.splitlines()[0])
    p.add_argument('root')
    p.add_argument('--num-classes', type=int, default=4)
    p.add_argument('--num-train', type=int, default=48)
    p.add_argument('--num-val', type=int, default=16)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    print(generate_ade_layout(a.root, a.num_classes, a.num_train, a.num_val, a.size, a.seed))


if __name__ == '__main__':
    main()
