"""The item access shared by the small classification sets held whole in memory (digits, Fashion-MNIST)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset


class InMemoryImageDataset(Dataset):
    """A split held as one tensor: subclasses set ``images`` ``(N, C_stored, S, S)`` float32,
    ``targets`` ``(N,)`` int64, ``in_channels`` and ``_augment`` (a transform or ``None``).

    Images may be stored with one channel and served with ``in_channels`` identical ones: the
    expansion is a view, so a grey set costs one channel of memory until :meth:`tensors` copies it.
    """

    images: torch.Tensor
    targets: torch.Tensor
    in_channels: int
    _augment: Callable[[torch.Tensor], torch.Tensor] | None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self._augment is not None:
            x = self._augment(x)
        return x.expand(self.in_channels, -1, -1), int(self.targets[index])

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as ``(X (N, in_channels, S, S) float32, y (N,) int64)``, un-augmented, as
        fresh copies (the sets are small: full-batch work on a GPU is one transfer)."""
        x = self.images.expand(-1, self.in_channels, -1, -1).clone()
        y = self.targets.clone()
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y
