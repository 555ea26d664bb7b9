"""ICNet (Zhao et al., ECCV 2018): image cascade over 1/1, 1/2 and 1/4 resolution inputs.

- 1/1 branch: three stride-2 ``conv3x3-BN-ReLU`` (32, 32, 64 channels) -> 1/8 resolution.
- 1/2 branch: the half-size image through the ResNet-50 stem, ``layer1`` and ``layer2`` -> 1/16.
- 1/4 branch: the 1/2 branch's ``layer2`` feature downsampled by 2 (1/32) through the dilated
  ``layer3``/``layer4`` of the same backbone, so the two low-resolution branches share weights and
  computation as in the official model; then ICNet's sum-style pyramid pooling (bins 1, 2, 3, 6
  added to the feature, no parameters) and a ``conv1x1 -> 256`` projection.
- Cascade feature fusion (CFF): upsample the coarser feature x2, ``conv3x3 (dilation 2) -> BN``;
  project the finer one with ``conv1x1 -> BN``; sum, ReLU. Each CFF has an auxiliary ``conv1x1``
  classifier on its upsampled coarse branch (the cascade label guidance), returned in training.
- The final 1/8 feature is upsampled x2, classified by ``conv1x1`` and upsampled to the input.

The full-width backbone is ResNet-50 (the official model uses a PSPNet-50 trunk); all logits are
returned at input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.segmentation._layers import NORMS, ConvBNReLU, NormLayer, check_common, scaled
from workbench.models.segmentation.dilated_resnet import DilatedResNet
from workbench.nn.norms import get_norm_layer


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _half(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return _resize(x, ((h + 1) // 2, (w + 1) // 2))


class SumPyramidPooling(nn.Module):
    """ICNet's pyramid pooling: average-pool at each bin size, upsample and *add* to the feature."""

    def __init__(self, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for b in self.bins:
            out = out + _resize(F.adaptive_avg_pool2d(x, b), x.shape[-2:])
        return out


class CascadeFeatureFusion(nn.Module):
    def __init__(self, low_channels: int, high_channels: int, out_channels: int, num_classes: int,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv_low = nn.Sequential(
            nn.Conv2d(low_channels, out_channels, 3, padding=2, dilation=2, bias=False),
            norm_layer(out_channels))
        self.conv_high = nn.Sequential(nn.Conv2d(high_channels, out_channels, 1, bias=False),
                                       norm_layer(out_channels))
        self.relu = nn.ReLU(inplace=False)
        self.classifier = nn.Conv2d(out_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.conv_low(_resize(low, high.shape[-2:]))
        fused = self.relu(low + self.conv_high(high))
        return fused, self.classifier(low)


class ICNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, norm: str = "bn",
                 depth: int = 50, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        check_common(num_classes, in_channels, width)
        norm_layer = get_norm_layer(norm, NORMS)
        self.num_classes = num_classes
        c32, c64, c128, c256 = (scaled(c, width) for c in (32, 64, 128, 256))
        self.sub1 = nn.Sequential(
            ConvBNReLU(in_channels, c32, 3, stride=2, norm_layer=norm_layer),
            ConvBNReLU(c32, c32, 3, stride=2, norm_layer=norm_layer),
            ConvBNReLU(c32, c64, 3, stride=2, norm_layer=norm_layer),
        )
        self.backbone = DilatedResNet(depth, width, in_channels, (False, True, True), norm_layer)
        c2, c4 = self.backbone.out_channels[1], self.backbone.out_channels[3]
        self.ppm = SumPyramidPooling(bins)
        self.ppm_proj = ConvBNReLU(c4, c256, 1, norm_layer=norm_layer)
        self.cff24 = CascadeFeatureFusion(c256, c2, c128, num_classes, norm_layer)
        self.cff12 = CascadeFeatureFusion(c128, c64, c128, num_classes, norm_layer)
        self.classifier = nn.Conv2d(c128, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        size = x.shape[-2:]
        x_sub1 = self.sub1(x)
        bb = self.backbone
        x_sub2 = bb.layer2(bb.layer1(bb.stem(_half(x))))
        x_sub4 = bb.layer4(bb.layer3(_half(x_sub2)))
        x_sub4 = self.ppm_proj(self.ppm(x_sub4))
        fused24, aux24 = self.cff24(x_sub4, x_sub2)
        fused12, aux12 = self.cff12(fused24, x_sub1)
        up = _resize(fused12, (fused12.shape[-2] * 2, fused12.shape[-1] * 2))
        out = _resize(self.classifier(up), size)
        if self.training:
            return {"out": out, "aux": [_resize(aux24, size), _resize(aux12, size)]}
        return out

    def cagm_sites(self) -> list[str]:
        """Backbone stage outputs, the 1/1 branch output, the pooled projection and each CFF's BN."""
        return self.backbone.stage_output_norms("backbone.") + [
            f"sub1.{len(self.sub1) - 1}.1", "ppm_proj.1", "cff24.conv_low.1", "cff12.conv_low.1"]


def icnet(num_classes: int, in_channels: int = 3, width: float = 1.0, norm: str = "bn", **kwargs) -> ICNet:
    return ICNet(num_classes, in_channels, width, norm, **kwargs)
