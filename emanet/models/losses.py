"""Segmentation losses that work on Paddle 3 (PaddleSeg 2.8.0's fail on its type promotion rules).

Both replace PaddleSeg's components of the same name, with the same arguments, so
``loss: types: [{type: CrossEntropyLoss}]`` in a PaddleSeg YAML builds these.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from emanet.errors import InvalidInput

EPS = 1e-8


def _per_pixel_cross_entropy(logit, label, ignore_index, weight):
    """Cross entropy for each pixel: logit [N, C, H, W], label [N, H, W] -> loss [N, H, W]; 0 where ignored."""
    return F.cross_entropy(logit.astype('float32'), label.unsqueeze(1), weight=weight,
                           ignore_index=ignore_index, reduction='none', axis=1).squeeze(1)


def _as_label(label):
    """Accept [N, H, W] or [N, 1, H, W] labels of any integer type."""
    if label.ndim == 4:
        label = label.squeeze(1)
    return label.astype('int64')


class CrossEntropyLoss(nn.Layer):
    """Pixel-wise cross entropy averaged over the non-ignored pixels.

    Args:
        weight (list, optional): one weight per class; the average is then weighted too.
        ignore_index (int): label value that contributes nothing.
        top_k_percent_pixels (float): keep only the hardest fraction of pixels (1.0 keeps all).
        avg_non_ignore (bool): average over valid pixels (True) or over all pixels.
        data_format (str): 'NCHW' or 'NHWC' logits.
    """

    def __init__(self, weight=None, ignore_index=255, top_k_percent_pixels=1.0, avg_non_ignore=True,
                 data_format='NCHW'):
        super().__init__()
        self.weight = None if weight is None else paddle.to_tensor(weight, dtype='float32')
        self.ignore_index = ignore_index
        self.top_k_percent_pixels = top_k_percent_pixels
        self.avg_non_ignore = avg_non_ignore
        self.data_format = data_format

    def forward(self, logit, label, semantic_weights=None):
        if self.data_format == 'NHWC':
            logit = logit.transpose([0, 3, 1, 2])
        if self.weight is not None and len(self.weight) != logit.shape[1]:
            raise InvalidInput(f"CrossEntropyLoss has {len(self.weight)} class weights but the model "
                             f"predicts {logit.shape[1]} classes")
        label = _as_label(label)
        loss = _per_pixel_cross_entropy(logit, label, self.ignore_index, self.weight)  # [N, H, W]
        valid = (label != self.ignore_index).astype('float32')
        if not self.avg_non_ignore:
            valid = paddle.ones_like(valid)
        if semantic_weights is not None:
            loss = loss * semantic_weights
        # With class weights the mean is over the weights of the counted pixels, as in PyTorch and PaddleSeg.
        norm = valid
        if self.weight is not None:
            norm = valid * paddle.gather(self.weight, label.clip(0, logit.shape[1] - 1).flatten()).reshape(label.shape)
        if self.top_k_percent_pixels < 1.0:
            k = max(int(self.top_k_percent_pixels * loss.numel()), 1)
            loss, indices = paddle.topk(loss.flatten(), k)
            norm = paddle.gather(norm.flatten(), indices)
        return loss.sum() / (norm.sum() + EPS)


class OhemCrossEntropyLoss(nn.Layer):
    """Online hard example mining cross entropy (Shrivastava et al.; as in PaddleSeg).

    Pixels whose predicted probability of the true class is below ``thresh`` count; if
    fewer than ``min_kept`` valid pixels are that hard, the ``min_kept`` hardest count.

    Args:
        thresh (float): probability below which a pixel is hard.
        min_kept (int): the least number of pixels kept per batch.
        ignore_index (int): label value that contributes nothing.
    """

    def __init__(self, thresh=0.7, min_kept=10000, ignore_index=255):
        super().__init__()
        self.thresh = thresh
        self.min_kept = min_kept
        self.ignore_index = ignore_index

    def forward(self, logit, label):
        label = _as_label(label)
        valid = label != self.ignore_index  # [N, H, W]
        loss = _per_pixel_cross_entropy(logit, label, self.ignore_index, None)  # [N, H, W]
        num_valid = int(valid.astype('int64').sum())
        kept = valid
        if 0 < self.min_kept <= num_valid:
            with paddle.no_grad():
                true_prob = paddle.exp(-loss)  # softmax probability of the true class
                true_prob = paddle.where(valid, true_prob, paddle.ones_like(true_prob))
                kth_hardest = paddle.sort(true_prob.flatten())[self.min_kept - 1]
                threshold = paddle.maximum(kth_hardest, paddle.to_tensor(self.thresh, dtype=true_prob.dtype))
                kept = valid & (true_prob <= threshold)
        kept = kept.astype('float32')
        return (loss * kept).sum() / (kept.sum() + EPS)
