"""Small building blocks shared by the segmentation networks: allowed norms, width scaling, Conv-BN-ReLU."""

from __future__ import annotations

from torch import nn

from workbench.nn.norms import NormLayer

# The norms a segmentation network takes (``workbench.nn.norms.get_norm_layer(norm, NORMS)``): it
# always normalises, since the pruning criterion lives on the BN scales.
NORMS = ("bn", "iebn")


def check_common(num_classes: int, in_channels: int, width: float) -> None:
    """Validate the options every segmentation builder shares, before any layer is made."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r} must be a positive integer")
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not 0 < width <= 4:
        raise ValueError(f"width={width!r} must be a number in (0, 4]; 1.0 is the published size")


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier; never below 2 so every layer stays prunable."""
    return max(2, int(round(channels * width)))


class ConvBNReLU(nn.Sequential):
    """``Conv2d(bias=False) -> norm -> ReLU`` (not in place, so hooks and captum see clean tensors)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=False),
        )
