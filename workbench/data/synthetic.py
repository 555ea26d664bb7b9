"""Synthetic CIFAR-shaped classification data: Gaussian images whose class shifts a few channels'
means. Deterministic per (seed, split); well conditioned (no constant regions), which makes it the
data of choice for numerical comparisons (DDP vs one process) and for timing without I/O."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ._validate import check_choice, check_int

SYNTHETIC_SPLITS = ("train", "test")


class SyntheticDataset(Dataset):
    task = "classification"
    in_channels = 3
    ignore_index = None

    def __init__(self, split: str, length: int | None = None, size: int = 32, num_classes: int = 10,
                 seed: int = 0) -> None:
        check_choice("split", split, SYNTHETIC_SPLITS)
        length = (2048 if split == "train" else 512) if length is None else length
        check_int("length", length, minimum=1)
        check_int("size", size, minimum=4)
        check_int("num_classes", num_classes, minimum=2)
        check_int("seed", seed, minimum=0)
        self.name, self.split, self.num_classes, self.image_size = "synthetic", split, num_classes, size
        self.classes = tuple(str(c) for c in range(num_classes))
        g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        self.targets = torch.randint(0, num_classes, (length,), generator=g)
        directions = torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
        self.data = torch.randn(length, 3, size, size, generator=g) + 0.5 * directions[self.targets]
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.targets[index])

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.clone().to(device), self.targets.clone().to(device)
