"""PSPNet (Zhao et al., CVPR 2017): dilated ResNet (output stride 8) + pyramid pooling module.

Head as in the reference implementation (hszhao/semseg): four branches ``AdaptiveAvgPool(bin) ->
conv1x1 (C -> C/4) -> BN -> ReLU`` for bins (1, 2, 3, 6), upsampled and concatenated with the
feature, then ``conv3x3 (2C -> 512) -> BN -> ReLU -> Dropout(0.1) -> conv1x1 -> classes``. The
auxiliary head sits on ``layer3`` (``conv3x3 -> 256 -> BN -> ReLU -> Dropout -> conv1x1``) and is
used in training only. All logits are upsampled bilinearly to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.segmentation._layers import NORMS, ConvBNReLU, NormLayer, check_common, scaled
from workbench.models.segmentation.dilated_resnet import DilatedResNet
from workbench.nn.norms import get_norm_layer


class PyramidPooling(nn.Module):
    """Pool at several bin sizes, project each to ``in_channels // len(bins)``, upsample, concat."""

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6),
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        reduction = max(2, in_channels // len(bins))
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, reduction, 1, bias=False),
                          norm_layer(reduction), nn.ReLU(inplace=False))
            for b in self.bins
        )
        self.out_channels = in_channels + reduction * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
                  for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


class SegHead(nn.Sequential):
    """``conv3x3 -> BN -> ReLU -> Dropout -> conv1x1`` (the PSPNet final and auxiliary heads)."""

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int, dropout: float = 0.1,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__(
            ConvBNReLU(in_channels, mid_channels, 3, norm_layer=norm_layer),
            nn.Dropout2d(dropout),
            nn.Conv2d(mid_channels, num_classes, 1),
        )


class PSPNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0,
                 norm: str = "bn", bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 aux: bool = True) -> None:
        super().__init__()
        check_common(num_classes, in_channels, width)
        if not bins or any(not isinstance(b, int) or b < 1 for b in bins):
            raise ValueError(f"bins={bins!r} must be a non-empty sequence of positive integers")
        norm_layer = get_norm_layer(norm, NORMS)
        self.num_classes = num_classes
        self.backbone = DilatedResNet(depth, width, in_channels, (False, True, True), norm_layer)
        c3, c4 = self.backbone.out_channels[2], self.backbone.out_channels[3]
        self.ppm = PyramidPooling(c4, bins, norm_layer)
        self.head = SegHead(self.ppm.out_channels, scaled(512, width), num_classes, dropout, norm_layer)
        self.aux_head = SegHead(c3, scaled(256, width), num_classes, dropout, norm_layer) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        _, _, c3, c4 = self.backbone(x)
        out = F.interpolate(self.head(self.ppm(c4)), size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(c3), size=size, mode="bilinear", align_corners=False)
            return {"out": out, "aux": aux}
        return out

    def cagm_sites(self) -> list[str]:
        """CAP's placement (CAG(PPM) figure): each backbone stage output BN and each pyramid branch BN."""
        return self.backbone.stage_output_norms("backbone.") + [
            f"ppm.branches.{i}.2" for i in range(len(self.ppm.branches))]


def pspnet_resnet18(num_classes: int, in_channels: int = 3, width: float = 1.0, norm: str = "bn",
                    **kwargs) -> PSPNet:
    return PSPNet(18, num_classes, in_channels, width, norm, **kwargs)


def pspnet_resnet50(num_classes: int, in_channels: int = 3, width: float = 1.0, norm: str = "bn",
                    **kwargs) -> PSPNet:
    return PSPNet(50, num_classes, in_channels, width, norm, **kwargs)


def pspnet_resnet101(num_classes: int, in_channels: int = 3, width: float = 1.0, norm: str = "bn",
                     **kwargs) -> PSPNet:
    return PSPNet(101, num_classes, in_channels, width, norm, **kwargs)
