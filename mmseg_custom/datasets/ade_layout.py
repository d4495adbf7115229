"""A dataset for any ADE20K-layout directory with K classes (mmseg's ADE20KDataset fixes 150)."""
from mmseg.datasets.builder import DATASETS
from mmseg.datasets.custom import CustomDataset

from .max_image_num import MaxImageNumMixin


@DATASETS.register_module()
class ADELayoutDataset(MaxImageNumMixin, CustomDataset):
    """``images/<split>/*.jpg`` + ``annotations/<split>/*.png``; label 0 = ignore, classes 1..K.

    Args:
        num_classes (int): K; class names become ``class1..classK`` unless ``classes`` is given.
        classes (Sequence[str], optional): Class names, overriding ``num_classes``.
        max_image_num (int, optional): InternVL's option: keep this many images, deterministically.
    """

    def __init__(self, num_classes=None, classes=None, max_image_num=None, subset_seed=0,
                 **kwargs):
        if classes is None:
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f'ADELayoutDataset needs num_classes >= 1 or classes, '
                                 f'got num_classes={num_classes!r}')
            classes = tuple(f'class{k}' for k in range(1, num_classes + 1))
        kwargs.setdefault('img_suffix', '.jpg')
        kwargs.setdefault('seg_map_suffix', '.png')
        kwargs.setdefault('reduce_zero_label', True)
        super().__init__(classes=classes, **kwargs)
        self._keep(max_image_num, subset_seed)
