"""Joint image/mask transforms for segmentation, on ``torchvision.transforms.v2``.

v2 dispatches on ``tv_tensors``: an ``Image`` is resized bilinearly, a ``Mask`` by nearest
neighbour, and fills can differ per type, so one pipeline moves both consistently.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScale(v2.Transform):
    """Resize image and mask together by a factor drawn uniformly from ``scale_range``."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range={scale_range!r} must satisfy 0 < low <= high")
        self.scale_range = (float(lo), float(hi))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        factor = lo + (hi - lo) * float(torch.rand(()))
        return {"size": [max(1, round(h * factor)), max(1, round(w * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return v2.functional.resize(inpt, params["size"], antialias=True)


def segmentation_transform(
    augment: bool,
    resize: int | tuple[int, int] | None = None,
    crop_size: tuple[int, int] | None = None,
    scale: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    mean: tuple[float, ...] | None = IMAGENET_MEAN,
    std: tuple[float, ...] | None = IMAGENET_STD,
    ignore_index: int = 255,
) -> v2.Compose:
    """Pipeline on ``(tv_tensors.Image uint8, tv_tensors.Mask)``: optional fixed ``resize``, then when
    ``augment`` random ``scale``, random ``crop_size`` crop (padded with 0 / ``ignore_index`` where
    the scaled image is smaller) and horizontal ``flip``; then float image in [0,1], normalised
    with ``mean``/``std`` (skipped when ``None``), int64 mask."""
    steps: list[Any] = []
    if resize is not None:
        # an int scales the shorter side (aspect kept), a pair sets (h, w)
        steps.append(v2.Resize(resize if isinstance(resize, int) else list(resize), antialias=True))
    if augment:
        if scale is not None:
            steps.append(RandomScale(scale))
        if crop_size is not None:
            steps.append(v2.RandomCrop(list(crop_size), pad_if_needed=True,
                                       fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                            scale=True))
    if mean is not None and std is not None:
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)
