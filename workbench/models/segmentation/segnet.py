"""SegNet (Badrinarayanan et al., TPAMI 2017): VGG16-BN encoder, mirrored decoder with max-unpooling.

Each encoder stage ends in a 2x2 max-pool whose argmax indices the matching decoder stage uses to
unpool; the decoder mirrors the encoder's 13 conv layers (the last one becomes the classifier,
3x3, with bias, no BN). About 29.4M parameters at ``width=1`` for 19 classes.

Pooling indices are integer tensors, so autograd (and hence Torch-Pruning's tracer) cannot see that
the channels an encoder stage pools must equal the channels its decoder partner unpools.
:meth:`SegNet.pruning_couplings` names those pairs so channel pruning keeps them in step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.segmentation._layers import NORMS, ConvBNReLU, NormLayer, check_common, scaled
from workbench.nn.norms import get_norm_layer

ENCODER = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))


def _stages(spec: tuple[tuple[int, ...], ...], channels: int, width: float,
            norm_layer: NormLayer) -> tuple[nn.ModuleList, int]:
    """One ``nn.Sequential`` of ConvBNReLU per stage of ``spec``, and the channels it ends with."""
    stages = []
    for stage in spec:
        layers = []
        for c in stage:
            layers.append(ConvBNReLU(channels, scaled(c, width), norm_layer=norm_layer))
            channels = scaled(c, width)
        stages.append(nn.Sequential(*layers))
    return nn.ModuleList(stages), channels


class SegNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, norm: str = "bn") -> None:
        super().__init__()
        check_common(num_classes, in_channels, width)
        norm_layer = get_norm_layer(norm, NORMS)
        self.num_classes = num_classes
        self.encoder, channels = _stages(ENCODER, in_channels, width, norm_layer)
        self.decoder, channels = _stages(DECODER, channels, width, norm_layer)
        self.classifier = nn.Conv2d(channels, num_classes, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            indices.append(idx)
        for stage, idx, size in zip(self.decoder, reversed(indices), reversed(sizes)):
            x = stage(F.max_unpool2d(x, idx, 2, 2, output_size=size))
        return self.classifier(x)

    def pruning_couplings(self) -> list[tuple[nn.Module, nn.Module]]:
        """Norm-layer pairs whose output channels must be pruned together.

        Decoder stage ``j`` (j >= 1) unpools the output of decoder stage ``j - 1`` with the indices of
        encoder stage ``4 - j``; both tensors must have the same channels.
        """
        n = len(self.encoder)
        return [(self.encoder[n - 1 - j][-1][1], self.decoder[j - 1][-1][1]) for j in range(1, n)]

    def cagm_sites(self) -> list[str]:
        """The last BN of every encoder and decoder stage (ten sites at full depth)."""
        enc = [f"encoder.{i}.{len(s) - 1}.1" for i, s in enumerate(self.encoder)]
        dec = [f"decoder.{i}.{len(s) - 1}.1" for i, s in enumerate(self.decoder)]
        return enc + dec


def segnet(num_classes: int, in_channels: int = 3, width: float = 1.0, norm: str = "bn") -> SegNet:
    return SegNet(num_classes, in_channels, width, norm)
