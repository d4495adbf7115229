"""The two pipeline steps InternVL's ADE20K configs add to mmseg's vocabulary.

``SETR_Resize`` (its test pipeline): mmseg's ``Resize``, plus, with ``setr_multi_scale=True``
and ``keep_ratio``, a short side of at least ``crop_size[0]``. mmseg 0.30's ``Resize`` has that
rule as ``min_size``, so this is ``Resize`` with the argument renamed.

``PadShortSide``: pads image and segmentation maps so that both sides are at least ``size``
(bottom and right, as mmcv's ``impad``); larger images pass unchanged. Slide inference needs a
full crop window.
"""
import mmcv
from mmseg.datasets.builder import PIPELINES
from mmseg.datasets.pipelines import Resize


@PIPELINES.register_module(name='SETR_Resize')
class SETRResize(Resize):

    def __init__(self, img_scale=None, multiscale_mode='range', ratio_range=None,
                 keep_ratio=True, crop_size=None, setr_multi_scale=False):
        if setr_multi_scale and crop_size is None:
            raise ValueError('SETR_Resize: setr_multi_scale=True needs crop_size')
        super().__init__(img_scale=img_scale, multiscale_mode=multiscale_mode,
                         ratio_range=ratio_range, keep_ratio=keep_ratio,
                         min_size=crop_size[0] if setr_multi_scale else None)


@PIPELINES.register_module()
class PadShortSide:

    def __init__(self, size, pad_val=0, seg_pad_val=255):
        self.size, self.pad_val, self.seg_pad_val = size, pad_val, seg_pad_val

    def __call__(self, results):
        h, w = results['img'].shape[:2]
        if h >= self.size and w >= self.size:
            return results
        shape = (max(h, self.size), max(w, self.size))
        results['img'] = mmcv.impad(results['img'], shape=shape, pad_val=self.pad_val)
        results['pad_shape'] = results['img'].shape
        for key in results.get('seg_fields', []):
            results[key] = mmcv.impad(results[key], shape=shape, pad_val=self.seg_pad_val)
        return results

    def __repr__(self):
        return f'{type(self).__name__}(size={self.size}, pad_val={self.pad_val})'
