"""A decode head's loss and accuracy at label size, a band of rows at a time.

mmseg's ``BaseDecodeHead.losses`` resizes the logits to the label's size (150 classes x 504 x 504
is 38 M float32 values per image, 152 MB), then cross-entropy, its backward and the accuracy
each read and write tensors of that size again: on a GPU the loss path of a linear head costs
more than the head. Here each band of output rows is resized, scored and differentiated while
it is small, and only the gradient of the small logits is kept:
no tensor at label size exists. Same loss, gradient and accuracy as mmseg's (to floating-point
rounding: sums in another order; tests/test_chunked_loss.py compares them), for the case the
study uses: one ``CrossEntropyLoss`` (softmax, mean, class weights and ``avg_non_ignore`` as
configured), no pixel sampler. Anything else takes mmseg's own path (``applies``).
"""
import torch
import torch.nn.functional as F
from mmseg.models.losses import CrossEntropyLoss

BAND_BYTES = 8 * 2 ** 20  # one band's float32 logits at label size
# a band's tensors alive at once while its loss and gradient run: the band, its
# log-probabilities, and the gradients of both (measured: tests/test_memory_plan.py)
BAND_TENSORS = 4


def covers(head):
    """Whether ``head``'s losses take the banded path (given float32 logits, as FCNHead's):
    its switch is on, one ``CrossEntropyLoss`` itself (a subclass may compute another loss),
    softmax, mean, no mask, no pixel sampler."""
    loss = head.loss_decode
    return (getattr(head, 'fused_loss', False) and type(loss) is CrossEntropyLoss
            and not loss.use_sigmoid and not loss.use_mask and loss.reduction == 'mean'
            and head.sampler is None)


def applies(head, seg_logit):
    """Whether ``head``'s losses of ``seg_logit`` are what ``losses`` computes (mmseg's path
    keeps half-precision logits in their dtype)."""
    return covers(head) and seg_logit.dtype == torch.float32


def band_rows(batch, classes, width):
    """Label rows per band: BAND_BYTES of float32 logits at label width."""
    return max(1, BAND_BYTES // (4 * batch * classes * width))


def losses(head, seg_logit, seg_label):
    """``BaseDecodeHead.losses(seg_logit, seg_label)`` for a head that ``applies``."""
    loss = head.loss_decode
    logits = seg_logit
    label = seg_label.squeeze(1)
    n, c = logits.shape[:2]
    rows = band_rows(n, c, label.shape[2])
    weight = None if loss.class_weight is None else logits.new_tensor(loss.class_weight)
    total, correct = _BandedCrossEntropy.apply(logits, label, weight, head.ignore_index,
                                               head.align_corners, rows)
    eps = torch.finfo(torch.float32).eps
    labelled = (label != head.ignore_index).sum().item()
    if loss.avg_non_ignore:  # as mmseg's cross_entropy: the mean over labelled pixels
        mean = total / (labelled + eps)
    else:  # torch's reduction='none' then mean: over every pixel, ignored ones at 0
        mean = total / label.numel()
    accuracy = (correct.float() + eps) * (100.0 / (labelled + eps))
    return {loss.loss_name: loss.loss_weight * mean, 'acc_seg': accuracy.reshape(1)}


class _BandedCrossEntropy(torch.autograd.Function):
    """(sum of the pixels' cross-entropy, pixels whose top class is their label) of the logits
    resized to the label's size; the gradient of the sum is computed band by band in the
    forward (each band's resize, loss and backward while it is small) and kept at logit size."""

    @staticmethod
    def forward(ctx, logits, label, weight, ignore_index, align_corners, rows):
        height, width = label.shape[1:]
        grad = torch.zeros_like(logits)
        total = logits.new_zeros(())
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        with torch.enable_grad(), torch.autocast(logits.device.type, enabled=False):
            for top in range(0, height, rows):
                bottom = min(height, top + rows)
                low, high, t = _source_rows(logits.shape[2], height, top, bottom, align_corners)
                first, last = int(low[0]), int(high[-1]) + 1  # the logit rows the band reads
                part = logits[:, :, first:last].detach().requires_grad_()
                band = _blend(part, low - first, high - first, t, (bottom - top, width),
                              align_corners)
                target = label[:, top:bottom]
                loss = F.cross_entropy(band, target, weight=weight, reduction='sum',
                                       ignore_index=ignore_index)
                grad[:, :, first:last] += torch.autograd.grad(loss, part)[0]
                total += loss.detach()
                with torch.no_grad():  # mmseg's accuracy: topk(1), labelled pixels only
                    top_class = band.topk(1, dim=1)[1].squeeze(1)
                    correct += ((top_class == target) & (target != ignore_index)).sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None


def _source_rows(in_height, out_height, top, bottom, align_corners):
    """For output rows ``top:bottom`` of a bilinear resize from ``in_height`` rows: the two
    source rows each blends (ascending) and the weight of the second, with torch's source
    coordinates (computed on the CPU: the band's bounds are read without a device sync)."""
    rows = torch.arange(top, bottom, dtype=torch.float32)
    if align_corners:
        scale = (in_height - 1) / (out_height - 1) if out_height > 1 else 0.0
        source = rows * scale
    else:
        source = ((rows + 0.5) * (in_height / out_height) - 0.5).clamp(min=0)
    low = source.long().clamp(max=in_height - 1)
    high = (low + 1).clamp(max=in_height - 1)
    return low, high, source - low


def _blend(x, low, high, t, size, align_corners):
    """The rows blended from ``x``'s rows ``low`` and ``high``, then the columns resized by torch
    itself (at an unchanged height its row coordinates are the rows themselves)."""
    device = x.device
    t = t.to(device).view(1, 1, -1, 1)
    blended = (x.index_select(2, low.to(device)) * (1 - t)
               + x.index_select(2, high.to(device)) * t)
    return F.interpolate(blended, size=size, mode='bilinear', align_corners=align_corners)


def _resized_rows(x, size, top, bottom, align_corners):
    """Rows ``top:bottom`` of ``F.interpolate(x, size, mode='bilinear', align_corners=...)``."""
    low, high, t = _source_rows(x.shape[2], size[0], top, bottom, align_corners)
    return _blend(x, low, high, t, (bottom - top, size[1]), align_corners)
