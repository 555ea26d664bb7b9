"""Dilated ResNet backbone (torchvision layout) for PSPNet and ICNet.

Written here rather than taken from torchvision because the segmentation nets need three things
torchvision's ``resnet`` does not give together: dilation in *basic* blocks (ResNet-18), a width
multiplier, and ``norm_layer`` injection of a BatchNorm2d subclass (IEBN) everywhere. Layout, names
and the ``replace_stride_with_dilation`` rule follow ``torchvision.models.resnet`` so state dicts
line up with it at ``width=1``. No pretrained weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workbench.models.segmentation._layers import NormLayer, scaled


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        # stride on the 3x3 (ResNet v1.5), as torchvision does
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


class DilatedResNet(nn.Module):
    """ResNet stem + four stages; ``forward`` returns the four stage outputs ``[c1, c2, c3, c4]``.

    ``replace_stride_with_dilation=(False, True, True)`` gives output stride 8 (PSPNet); the
    stride-2 of a stage becomes a dilation and later stages dilate further, as in torchvision.
    """

    def __init__(self, depth: int, width: float = 1.0, in_channels: int = 3,
                 replace_stride_with_dilation: Sequence[bool] = (False, True, True),
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth={depth!r} is not valid; allowed: {sorted(DEPTHS)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation must have 3 booleans (layer2, layer3, layer4), "
                             f"got {replace_stride_with_dilation!r}")
        kind, layers = DEPTHS[depth]
        self.block = BLOCKS[kind]
        self._norm_layer = norm_layer
        self.inplanes = scaled(64, width)
        self.dilation = 1
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(scaled(64, width), layers[0])
        self.layer2 = self._make_layer(scaled(128, width), layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(scaled(256, width), layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(scaled(512, width), layers[3], 2, replace_stride_with_dilation[2])
        self.out_channels = [scaled(c, width) * self.block.expansion for c in (64, 128, 256, 512)]
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * self.block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * self.block.expansion, 1, stride=stride, bias=False),
                norm_layer(planes * self.block.expansion),
            )
        layers = [self.block(self.inplanes, planes, stride, downsample, previous_dilation, norm_layer)]
        self.inplanes = planes * self.block.expansion
        for _ in range(1, blocks):
            layers.append(self.block(self.inplanes, planes, dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def stage_output_norms(self, prefix: str = "") -> list[str]:
        """Names of the last norm layer of each stage (the stage-output BN sites CAP guides)."""
        last = "bn2" if self.block is BasicBlock else "bn3"
        names = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            names.append(f"{prefix}layer{i}.{len(layer) - 1}.{last}")
        return names
