"""What the mmseg registries gain. Importing this package applies the torch-2 compatibility shims
and registers our FCNHead (replacing mmseg's), backbones, datasets and hooks."""
from . import compat

compat.apply()

from . import datasets, hooks, models  # noqa: E402,F401  (registration side effects)
