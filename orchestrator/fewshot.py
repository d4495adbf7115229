"""Few-shot training subsets that are the same everywhere and nested.

A fraction f keeps round(f * N) images: the first ones of a seeded permutation of the sorted file
list. Every process, rank and run computes the same list from the same directory, and a smaller
fraction's subset is a prefix of a larger one's (1/16 inside 1/8 inside ...) for one seed; other
seeds give other subsets (``fewshot.seeds``: the spread over subsets). InternVL's own code keeps
``max_image_num`` images after a ``random.shuffle`` seeded by the run's seed.
"""
import os

import numpy as np


def list_images(img_dir, img_suffix='.jpg'):
    """Image names without suffix (mmseg's split-file format), sorted; recursive like mmseg."""
    names = []
    for dirpath, _, files in os.walk(img_dir):
        rel = os.path.relpath(dirpath, img_dir)
        for f in files:
            if f.endswith(img_suffix):
                name = f[:-len(img_suffix)]
                names.append(name if rel == '.' else os.path.join(rel, name))
    return sorted(names)


def seeded_prefix(names, keep, seed=0):
    """The first ``keep`` names of the seeded permutation of the sorted names."""
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in order[:keep]]


def fewshot_subset(names, fraction, seed=0):
    """The kept names, in permutation order; fraction in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'few-shot fraction must be in (0, 1], got {fraction!r}')
    keep = max(1, int(round(fraction * len(names)))) if names else 0
    return seeded_prefix(names, keep, seed)


def write_split_file(img_dir, fraction, path, seed=0, img_suffix='.jpg'):
    """Write the subset as an mmseg split file (one name per line); return the kept names."""
    kept = fewshot_subset(list_images(img_dir, img_suffix), fraction, seed)
    with open(path, 'w') as f:
        f.write('\n'.join(kept) + '\n')
    return kept
