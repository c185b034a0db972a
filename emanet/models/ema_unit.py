"""The Expectation-Maximization Attention Unit (Li et al., ICCV 2019)."""
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

from emanet.errors import InvalidInput


class EMAU(nn.Layer):
    """Expectation-Maximization Attention Unit.

    The unit reconstructs a feature map from K bases found by a few EM steps.
    With x the input flattened to [B, C, N] (N = H*W) and mu the bases [B, C, K]:

    - E-step: z = softmax_K(x^T mu)                       # [B, N, K] responsibilities
    - M-step: mu = l2norm_C(x z / sum_N z)                # [B, C, K] new bases
    - repeat both ``stage_num`` (T) times starting from the learned bases ``mu``;
    - output: x_hat = mu z^T                               # [B, C, N] -> [B, C, H, W]

    The EM steps run without gradient, so no gradient reaches the input of this
    unit: mu and z are treated as a fixed, data-dependent low-rank reconstruction.
    The paper's authors found that back-propagating through the EM iterations is
    unstable and no better; PaddleSeg's released weights were trained this way.

    Bases update, in training mode only: the initial bases are a moving average
    of the batch's final bases,
        mu_batch = l2norm_C(mean over the global batch of mu)    # [1, C, K]
        mu <- (1 - momentum) * mu + momentum * mu_batch
    With several data-parallel processes the batch mean is all-reduced first, so
    every rank holds identical bases. In eval mode the bases never change.

    The EM steps always run in float32, also inside ``paddle.amp.auto_cast`` and when
    ``paddle.amp.decorate(level='O2')`` has cast ``mu`` to fp16/bf16: the softmax and the
    normalisations lose too much precision there. The bases are blended in float32 and
    stored back in ``mu``'s own dtype.

    Args:
        channels (int): C, the channels of the input and output.
        num_bases (int): K, the number of bases.
        stage_num (int): T, the number of EM iterations.
        momentum (float): weight of the batch's bases in the moving average.
    """

    def __init__(self, channels, num_bases, stage_num=3, momentum=0.1):
        super().__init__()
        if stage_num < 1:
            raise InvalidInput(f"stage_num must be >= 1, got {stage_num}")
        self.channels = channels
        self.num_bases = num_bases
        self.stage_num = stage_num
        self.momentum = momentum
        initial = paddle.randn([1, channels, num_bases]) * (2.0 / num_bases) ** 0.5
        self.register_buffer('mu', F.normalize(initial, p=2, axis=1))  # [1, C, K]

    def forward(self, x):
        x32 = x.detach().astype('float32')
        # [B, C, H, W], dynamic so exported models take any size; read from the float32 copy, as
        # Paddle 3.0 has no CPU shape kernel for float16/bfloat16
        shape = paddle.shape(x32)
        feats = x32.flatten(2)  # [B, C, N]
        with paddle.no_grad(), paddle.amp.auto_cast(enable=False):
            bases, resp = em_iterations(feats, self.mu.astype('float32'), self.stage_num)
            recon = paddle.matmul(bases, resp, transpose_y=True)  # [B, C, N]
            if self.training:
                self.update_bases(bases)
        recon = paddle.reshape(recon, [0, self.channels, shape[2], shape[3]])
        return recon.astype(x.dtype)

    def update_bases(self, bases):
        """Blend the batch's final bases [B, C, K] into the learned bases (training only)."""
        batch_bases = bases.mean(axis=0, keepdim=True)  # [1, C, K]
        world_size = dist.get_world_size()
        if world_size > 1:
            dist.all_reduce(batch_bases)
            batch_bases = batch_bases / world_size
        batch_bases = F.normalize(batch_bases, p=2, axis=1)
        blended = self.mu.astype('float32') * (1 - self.momentum) + batch_bases * self.momentum
        paddle.assign(blended.astype(self.mu.dtype), output=self.mu)


def em_iterations(feats, bases, stage_num):
    """``stage_num`` EM iterations on feats [B, C, N] from the initial bases [1, C, K] (or [B, C, K]);
    return the final bases [B, C, K] and responsibilities [B, N, K] (E-step and M-step of ``EMAU``)."""
    # The learned bases [1, C, K] broadcast over the batch in the first product: tiling them over
    # a dynamic batch became a Tile of unknown rank in the ONNX graph, which OpenVINO cannot compile.
    feats_t = feats.transpose([0, 2, 1])  # [B, N, C]
    for _ in range(stage_num):
        resp = F.softmax(paddle.matmul(feats_t, bases), axis=2)  # [B, N, K]
        resp_over_pixels = F.normalize(resp, p=1, axis=1)  # [B, N, K], sums to 1 over N
        bases = F.normalize(paddle.matmul(feats, resp_over_pixels), p=2, axis=1)  # [B, C, K]
    return bases, resp
