"""EMANet: a dilated ResNet, the EM attention head, and an auxiliary FCN head."""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddleseg.models import layers

from emanet.models.ema_unit import EMAU


class EMAHead(nn.Layer):
    """The EMANet head, with the parameter names of PaddleSeg's so its checkpoints load as they are.

    main: C4 -> ema_in_conv -> ema_mid_conv -> EMAU -> ReLU -> ema_out_conv, added to the
    ema_in_conv output (a residual), ReLU -> bottleneck -> [conv_cat over concat(C4, .)] -> cls.
    aux:  C3 -> ConvBNReLU -> Dropout -> 1x1 conv, run in training mode only.

    Args:
        num_classes (int): number of classes.
        in_channels (tuple): channels of (C3, C4), the two backbone outputs the head reads.
        ema_channels (int): channels inside the EM attention block.
        gc_channels (int): channels after the bottleneck.
        num_bases (int), stage_num (int), momentum (float): see ``EMAU``.
        concat_input (bool): concatenate C4 with the attention output before classifying.
        enable_auxiliary_loss (bool): build the auxiliary head on C3.
    """

    def __init__(self, num_classes, in_channels, ema_channels=512, gc_channels=256, num_bases=64,
                 stage_num=3, momentum=0.1, concat_input=True, enable_auxiliary_loss=True):
        super().__init__()
        aux_channels, self.in_channels = in_channels
        self.concat_input = concat_input
        self.enable_auxiliary_loss = enable_auxiliary_loss

        self.emau = EMAU(ema_channels, num_bases, stage_num, momentum=momentum)
        self.ema_in_conv = layers.ConvBNReLU(self.in_channels, ema_channels, kernel_size=3)
        self.ema_mid_conv = nn.Conv2D(ema_channels, ema_channels, kernel_size=1)
        # No gradient passes through the EM unit, so this conv never learns; freezing it
        # keeps it out of weight decay and out of data-parallel gradient sync.
        for param in self.ema_mid_conv.parameters():
            param.stop_gradient = True
        self.ema_out_conv = layers.ConvBNReLU(ema_channels, ema_channels, kernel_size=1)
        self.bottleneck = layers.ConvBNReLU(ema_channels, gc_channels, kernel_size=3)
        self.cls = nn.Sequential(nn.Dropout2D(p=0.1), nn.Conv2D(gc_channels, num_classes, 1))
        if enable_auxiliary_loss:
            self.aux = nn.Sequential(
                layers.ConvBNReLU(aux_channels, 256, kernel_size=3),
                nn.Dropout2D(p=0.1),
                nn.Conv2D(256, num_classes, 1))
        if concat_input:
            self.conv_cat = layers.ConvBNReLU(self.in_channels + gc_channels, gc_channels, kernel_size=3)

    def forward(self, feat_list):
        c3, c4 = feat_list
        identity = self.ema_in_conv(c4)
        recon = self.emau(self.ema_mid_conv(identity))
        recon = self.ema_out_conv(F.relu(recon))
        out = self.bottleneck(F.relu(identity + recon))
        if self.concat_input:
            out = self.conv_cat(paddle.concat([c4, out], axis=1))
        logits = [self.cls(out)]
        if self.training and self.enable_auxiliary_loss:
            logits.append(self.aux(c3))
        return logits


def resize_bilinear(logits, size, align_corners):
    """Bilinear resize of logits [N, C, h, w] to ``size`` (H, W)."""
    return F.interpolate(logits, size, mode='bilinear', align_corners=align_corners)


class EMANet(nn.Layer):
    """Expectation-Maximization Attention Network (Li et al., ICCV 2019).

    Same constructor and state_dict as ``paddleseg.models.EMANet``. Returns a list of
    logits at input resolution: [main, aux] in training mode, [main] in eval mode.

    Args:
        num_classes (int): number of classes.
        backbone (nn.Layer): a backbone with ``feat_channels``, e.g. ResNet50_vd(output_stride=8).
        backbone_indices (tuple): which backbone outputs feed the aux head and the EM head.
        ema_channels, gc_channels, num_bases, stage_num, momentum, concat_input,
        enable_auxiliary_loss: see ``EMAHead``.
        align_corners (bool): for the final bilinear upsampling.
        pretrained (str): path or URL of weights for the whole model.
    """

    def __init__(self, num_classes, backbone, backbone_indices=(2, 3), ema_channels=512,
                 gc_channels=256, num_bases=64, stage_num=3, momentum=0.1, concat_input=True,
                 enable_auxiliary_loss=True, align_corners=False, pretrained=None):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.backbone_indices = tuple(backbone_indices)
        in_channels = [backbone.feat_channels[i] for i in self.backbone_indices]
        self.head = EMAHead(num_classes, in_channels, ema_channels, gc_channels, num_bases,
                            stage_num, momentum, concat_input, enable_auxiliary_loss)
        self.align_corners = align_corners
        # How logits reach the input size. emanet.deploy.static_graph swaps in an equal matrix-product
        # resize while it traces the model: Paddle 3.3's oneDNN inference cannot run bilinear_interp.
        self.resize_logits = resize_bilinear
        self.pretrained = pretrained
        if pretrained is not None:
            from emanet.checkpoint import load_weights
            load_weights(self, pretrained)

    def forward(self, x):
        feats = self.backbone(x)
        logits = self.head([feats[i] for i in self.backbone_indices])
        size = paddle.shape(x)[2:]
        return [self.resize_logits(logit, size, self.align_corners) for logit in logits]
