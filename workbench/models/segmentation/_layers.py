"""Small building blocks shared by the segmentation networks: norm choice, width scaling, Conv-BN-ReLU."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NormLayer = Callable[[int], nn.Module]

NORMS = ("bn", "iebn")


def resolve_norm(norm: str) -> NormLayer:
    """``"bn"`` -> ``nn.BatchNorm2d``, ``"iebn"`` -> ``workbench.nn.IEBN2d`` (a BatchNorm2d subclass).

    Segmentation networks always normalise: the pruning criterion lives on the BN scales.
    """
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "iebn":
        from workbench.nn import IEBN2d  # imported late: models build without the attention layers

        return IEBN2d
    raise ValueError(f"norm={norm!r} is not valid for a segmentation network; allowed: {NORMS}")


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
