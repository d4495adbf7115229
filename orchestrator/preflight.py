"""A resolved config against the file system, before any work: its dataset directories and its
backbone weight file. The driver checks before Ray starts; each worker checks again on its own
node (shared storage that one node does not mount fails there with the path, not mid-training).
"""
import os.path as osp

from orchestrator.errors import ConfigError
from orchestrator.keys import WEIGHTS_KEY


def dataset_configs(ds):
    """The dataset configs in ``ds`` (a dataset config or a list of them), wrappers opened
    (FewShotSubset, mmseg's RepeatDataset: their ``dataset``)."""
    if ds is None:
        return []
    if isinstance(ds, (list, tuple)):
        return [d for item in ds for d in dataset_configs(item)]
    return dataset_configs(ds['dataset']) if 'dataset' in ds else [ds]


def check_data_paths(cfg, source='config'):
    """Fail before any work when a dataset directory is missing, naming the key and the path."""
    for split in ('train', 'val'):
        for d in dataset_configs(cfg.data.get(split)):
            root = d.get('data_root')
            for key in ('img_dir', 'ann_dir'):
                rel = d.get(key)
                if rel is None:
                    continue
                path = rel if (osp.isabs(rel) or root is None) else osp.join(root, rel)
                if not osp.isdir(path):
                    raise ConfigError(
                        f'{source}: data.{split}.{key}: directory not found: {osp.abspath(path)}')


def check_weights_path(cfg, source='config'):
    """A backbone weight file that is not there fails now, not after the sweep has started."""
    weights = cfg.model.get('backbone', {}).get('pretrained')
    if isinstance(weights, str) and not osp.isfile(weights):
        raise ConfigError(f'{source}: {WEIGHTS_KEY}: file not found: {weights} (set it with '
                          f'overrides: {{{WEIGHTS_KEY}: /path/to/weights}})')
