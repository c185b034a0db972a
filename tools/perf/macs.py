"""Parameters and multiply-adds: Conv2D layers counted by forward hooks, the EM unit and a non-local block by
their formulas."""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from emanet.models import EMAU


# EM unit and non-local block are compared on a feature map [1, 512, H, W]; by default
# (W, H) = (128, 64), the EM head's input for a 1024x512 image at output stride 8.
ATTENTION_CHANNELS = 512

NON_LOCAL_INTER_CHANNELS = 256

EM_UNIT_MACS_FORMULA = '(2T+1)*N*C*K'

def em_unit_macs(num_pixels, channels, num_bases, stage_num):
    """Multiply-adds of the EM unit: (2T+1)*N*C*K.

    Each of the T iterations multiplies x^T mu (N*C*K) and x z (N*C*K); the reconstruction
    mu z^T adds one more N*C*K. Softmax and normalisations are O(N*K) and left out.
    """
    return (2 * stage_num + 1) * num_pixels * channels * num_bases

def non_local_macs(num_pixels, channels, inter_channels):
    """Multiply-adds of ``NonLocalBlock``: four 1x1 convs (4*N*C*C') and two N x N products (2*N^2*C')."""
    return 4 * num_pixels * channels * inter_channels + 2 * num_pixels ** 2 * inter_channels

class NonLocalBlock(nn.Layer):
    """Benchmark reference only, not part of EMANet: the embedded-Gaussian non-local block
    (Wang et al., CVPR 2018), the attention EMANet was proposed to replace.

    z = x + BN(W y) with y = softmax_N(theta(x)^T phi(x)) g(x): every pixel attends to all N
    pixels, so time and memory grow with N^2 where the EM unit's grow with N*K.
    """

    def __init__(self, channels, inter_channels):
        super().__init__()
        self.theta = nn.Conv2D(channels, inter_channels, 1)
        self.phi = nn.Conv2D(channels, inter_channels, 1)
        self.g = nn.Conv2D(channels, inter_channels, 1)
        self.out_conv = nn.Conv2D(inter_channels, channels, 1)
        self.out_bn = nn.BatchNorm2D(channels)

    def forward(self, x):
        shape = paddle.shape(x)  # [B, C, H, W]
        theta = self.theta(x).flatten(2).transpose([0, 2, 1])  # [B, N, C']
        phi = self.phi(x).flatten(2)  # [B, C', N]
        g = self.g(x).flatten(2).transpose([0, 2, 1])  # [B, N, C']
        attention = F.softmax(paddle.bmm(theta, phi), axis=2)  # [B, N, N]
        y = paddle.bmm(attention, g).transpose([0, 2, 1])  # [B, C', N]
        y = paddle.reshape(y, [0, 0, shape[2], shape[3]])  # [B, C', H, W]
        return x + self.out_bn(self.out_conv(y))

def count_macs(model, input_shape):
    """Parameters and multiply-adds of ``model`` (in eval mode) for one input of ``input_shape``.

    Conv2D layers are counted by forward hooks (output elements x input channels per group x
    kernel area); each EM unit adds ``em_unit_macs``. BatchNorm, activations, softmax and the
    bilinear resize are not counted. Returns a JSON-serialisable dict.
    """
    counts = {'conv': 0, 'em_unit': 0}
    em_terms = []

    def conv_hook(layer, inputs, output):
        counts['conv'] += int(np.prod(output.shape)) * int(np.prod(layer.weight.shape[1:]))

    def em_unit_hook(layer, inputs):
        batch, channels, height, width = inputs[0].shape
        num_pixels = batch * height * width
        counts['em_unit'] += em_unit_macs(num_pixels, channels, layer.num_bases, layer.stage_num)
        em_terms.append({'N': num_pixels, 'C': channels, 'K': layer.num_bases, 'T': layer.stage_num})

    hooks = []
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, nn.Conv2D):
            hooks.append(layer.register_forward_post_hook(conv_hook))
        elif isinstance(layer, EMAU):
            hooks.append(layer.register_forward_pre_hook(em_unit_hook))
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(paddle.zeros(input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        if was_training:
            model.train()
    return {
        'params': sum(int(np.prod(p.shape)) for p in model.parameters()),
        'conv_macs': counts['conv'],
        'em_unit_macs': counts['em_unit'],
        'total_macs': counts['conv'] + counts['em_unit'],
        'em_unit_formula': EM_UNIT_MACS_FORMULA,
        'em_unit_terms': em_terms,
        'input_shape': list(input_shape),
    }
