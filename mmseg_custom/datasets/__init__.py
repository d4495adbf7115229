from .ade_layout import ADELayoutDataset
from .fewshot import fewshot_subset, list_images, write_split_file
from .synthetic import generate_ade_layout

__all__ = [
    "ADELayoutDataset", "fewshot_subset", "generate_ade_layout", "list_images", "write_split_file"]
