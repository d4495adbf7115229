"""What the mmseg registries gain. Importing this package applies the torch-2 compatibility shims
and registers our FCNHead (replacing mmseg's), backbones (InternViT), datasets, hooks and
InternVL's layer-decay optimizer constructor, and makes mmcv's file writes atomic."""
from . import compat

compat.apply()

from . import atomic_files, datasets, hooks, models, optimizers  # noqa: E402,F401  (registrations)
