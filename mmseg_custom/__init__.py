"""What the mmseg registries gain. Importing this package applies the torch-2 compatibility shims
and registers our FCNHead (replacing mmseg's), backbones (InternViT), datasets, hooks and
InternVL's layer-decay optimizer constructor."""
from . import compat

compat.apply()

from . import datasets, hooks, models, optimizers  # noqa: E402,F401  (registration side effects)
