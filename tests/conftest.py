"""Shared fixtures. Test files never import each other (mmseg's wheel owns a top-level `tests`)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / 'configs' / 'tiny_fcn_synthetic.py'


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """The demo's generated dataset (4 classes, 48 train / 16 val, 64 px), once per session."""
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    return generate_ade_layout(tmp_path_factory.mktemp('data') / 'synthetic_ade')


@pytest.fixture
def tiny_cfg(synthetic_root):
    """The tiny CPU config pointed at the session's generated data."""
    from mmcv import Config
    cfg = Config.fromfile(str(TINY_CONFIG))
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(synthetic_root)
    return cfg


@pytest.fixture
def cli_env():
    """Environment for subprocesses: the venv's bin first, sane thread counts for 2 cores."""
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')
    return env
