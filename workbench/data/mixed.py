"""The mix-dataset attack: batches drawn from two distributions at once.

IEBN's second noise attack (docs/methods.md, *Batch-statistic noise attacks*) trains on batches that mix data of different
distributions, so every batch statistic is a statistic of a mixture that fits neither part. Here:

- :class:`ShiftedDataset` -- a distribution-shifted copy of an image dataset (inverted, low
  contrast, or coloured), same labels. The shift acts on intensities in ``[0, 1]`` (the base's
  normalisation is undone, the shift applied, the base's normalisation re-applied), so both
  sources go through the *same* input normalisation and differ in distribution only.
- :class:`MixedDataset` -- the union of two classification datasets; a shuffled loader over it
  gives batches mixing both. Every item remembers its source (``sources``), and
  :func:`per_source_accuracy` reports accuracy on each source's own part.

Label space: when both sources have the same classes (digits and a shifted copy) the union label
space *is* that class set (``label_mode="shared"``): a "3" is a "3" whatever its distribution, so
the task stays the same and only the batch statistics are attacked. Sources with different classes
get disjoint labels (``"offset"``: the second source's labels follow the first's). ``"auto"``
picks shared when the class lists are equal, offset otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler, Subset

from ._validate import check_choice

SHIFTS = ("invert", "contrast", "color")
LABEL_MODES = ("auto", "shared", "offset")

# per-channel gain and offset of the "color" shift: a dark-red-on-teal rendering of a grey image
_COLOR_GAIN = (0.9, 0.35, 0.15)
_COLOR_OFFSET = (0.1, 0.45, 0.6)


def _shift_fn(shift: str) -> Callable[[Tensor], Tensor]:
    if shift == "invert":
        return lambda v: 1.0 - v
    if shift == "contrast":
        # low contrast on a raised black level: the digit spans [0.3, 0.7] instead of [0, 1]
        return lambda v: 0.3 + 0.4 * v

    def color(v: Tensor) -> Tensor:
        c = v.shape[0]
        gain = torch.tensor(_COLOR_GAIN[:c], dtype=v.dtype).view(c, 1, 1)
        offset = torch.tensor(_COLOR_OFFSET[:c], dtype=v.dtype).view(c, 1, 1)
        return offset + gain * v

    return color


def _targets_of(dataset: Dataset) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.int64)


class ShiftedDataset(Dataset):
    """``base`` with a fixed intensity shift applied to every image; labels unchanged.

    ``shift``: ``"invert"`` (``1 - v``: bright background, dark digit), ``"contrast"``
    (``0.3 + 0.4 v``) or ``"color"`` (per-channel gain/offset, so the channels differ), or a callable
    on ``[0, 1]`` intensity images ``(C, H, W)``. ``base`` must have ``mean``/``std`` (per channel),
    as every dataset of ``workbench.data`` does.
    """

    def __init__(self, base: Dataset, shift: str | Callable[[Tensor], Tensor] = "invert") -> None:
        if not callable(shift):
            check_choice("shift", shift, SHIFTS)
        for attr in ("mean", "std"):
            if not hasattr(base, attr):
                raise ValueError(f"base={type(base).__name__} has no {attr!r}; allowed: a dataset with per-channel "
                                 "mean and std (any workbench.data classification dataset)")
        self.base = base
        self.shift = shift
        self._fn = shift if callable(shift) else _shift_fn(shift)
        self._mean = torch.tensor(base.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(base.std, dtype=torch.float32).view(-1, 1, 1)
        label = shift if isinstance(shift, str) else getattr(shift, "__name__", "custom")
        self.name = f"{getattr(base, 'name', type(base).__name__)}-{label}"
        self.split = getattr(base, "split", None)
        self.task = getattr(base, "task", "classification")
        self.num_classes = base.num_classes
        self.classes = tuple(base.classes)
        self.in_channels = getattr(base, "in_channels", None)
        self.ignore_index = None
        self.mean, self.std = tuple(base.mean), tuple(base.std)
        self.targets = _targets_of(base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.base[index]
        v = x * self._std + self._mean
        return ((self._fn(v) - self._mean) / self._std).to(x.dtype), y

    def __repr__(self) -> str:
        return f"ShiftedDataset({self.base!r}, shift={self.shift!r})"


class MixedDataset(Dataset):
    """Union of two classification datasets with per-item source, for the mix-dataset attack.

    ``label_mode``: see the module docstring. ``proportion``: share of the second source in the
    mixture (``None``: everything from both); the larger side is subsampled (fixed ``seed``) to
    reach it while keeping as many samples as possible. ``names`` label the sources (default: each
    dataset's ``name``).
    """

    task = "classification"
    ignore_index = None

    def __init__(self, first: Dataset, second: Dataset, label_mode: str = "auto", proportion: float | None = None,
                 names: Sequence[str] | None = None, seed: int = 0) -> None:
        check_choice("label_mode", label_mode, LABEL_MODES)
        for which, ds in (("first", first), ("second", second)):
            if getattr(ds, "task", "classification") != "classification":
                raise ValueError(f"{which}={ds!r} has task {ds.task!r}; allowed: classification datasets")
            if not hasattr(ds, "num_classes") or len(ds) == 0:
                raise ValueError(f"{which}={ds!r} is not valid; allowed: a non-empty dataset with num_classes")
        if proportion is not None and not (isinstance(proportion, (int, float)) and 0.0 < proportion < 1.0):
            raise ValueError(f"proportion={proportion!r} is not valid; allowed: None or a number in (0, 1)")
        shape_a, shape_b = tuple(first[0][0].shape), tuple(second[0][0].shape)
        if shape_a != shape_b:
            raise ValueError(f"second has item shape {shape_b} but first has {shape_a}; allowed: equal shapes")
        classes_a = tuple(getattr(first, "classes", range(first.num_classes)))
        classes_b = tuple(getattr(second, "classes", range(second.num_classes)))
        if label_mode == "auto":
            label_mode = "shared" if classes_a == classes_b else "offset"
        if label_mode == "shared" and first.num_classes != second.num_classes:
            raise ValueError(f"label_mode='shared' needs equal class counts, got {first.num_classes} and "
                             f"{second.num_classes}; allowed: 'offset' or 'auto' for different label sets")
        self.label_mode = label_mode
        if names is None:
            names = (getattr(first, "name", "first"), getattr(second, "name", "second"))
        names = tuple(names)
        if len(names) != 2 or len(set(names)) != 2:
            raise ValueError(f"names={names!r} is not valid; allowed: two distinct names")
        self.source_names = names
        self.datasets = (first, second)
        idx_a, idx_b = torch.arange(len(first)), torch.arange(len(second))
        if proportion is not None:
            idx_a, idx_b = _subsample(idx_a, idx_b, float(proportion), seed)
        self._index = [(0, int(i)) for i in idx_a] + [(1, int(i)) for i in idx_b]
        self.offset = 0 if label_mode == "shared" else first.num_classes
        if label_mode == "shared":
            self.num_classes = first.num_classes
            self.classes = classes_a
        else:
            self.num_classes = first.num_classes + second.num_classes
            self.classes = tuple(f"{names[0]}:{c}" for c in classes_a) + tuple(f"{names[1]}:{c}" for c in classes_b)
        targets_a, targets_b = _targets_of(first)[idx_a], _targets_of(second)[idx_b] + self.offset
        self.targets = torch.cat([targets_a, targets_b])
        self.sources = torch.cat([torch.zeros(len(idx_a), dtype=torch.int64),
                                  torch.ones(len(idx_b), dtype=torch.int64)])
        self.in_channels = getattr(first, "in_channels", shape_a[0])
        self.mean, self.std = getattr(first, "mean", None), getattr(first, "std", None)
        self.split = getattr(first, "split", None)
        self.name = f"mix({names[0]}, {names[1]})"

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        source, i = self._index[index]
        x, y = self.datasets[source][i]
        return x, int(y) + (self.offset if source == 1 else 0)

    def source_subset(self, source: int | str) -> Subset:
        """The items of one source (by index 0/1 or by name), labels in the union space."""
        s = self._source_index(source)
        return Subset(self, torch.nonzero(self.sources == s).flatten().tolist())

    def _source_index(self, source: int | str) -> int:
        if source in (0, 1) and not isinstance(source, bool):
            return int(source)
        if source in self.source_names:
            return self.source_names.index(source)
        raise ValueError(f"source={source!r} is not valid; allowed: 0, 1 or one of {self.source_names}")

    def __repr__(self) -> str:
        counts = [int((self.sources == s).sum()) for s in (0, 1)]
        return (f"MixedDataset({self.source_names[0]}: {counts[0]}, {self.source_names[1]}: {counts[1]}, "
                f"label_mode={self.label_mode!r}, num_classes={self.num_classes})")


def _subsample(idx_a: Tensor, idx_b: Tensor, proportion: float, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n_a, n_b = len(idx_a), len(idx_b)
    # largest mixture with n_b' / (n_a' + n_b') == proportion, n_a' <= n_a, n_b' <= n_b
    want_b = round(n_a * proportion / (1.0 - proportion))
    if want_b <= n_b:
        keep_a, keep_b = n_a, max(1, want_b)
    else:
        keep_b, keep_a = n_b, max(1, round(n_b * (1.0 - proportion) / proportion))
    pick_a = idx_a[torch.randperm(n_a, generator=gen)[:keep_a].sort().values]
    pick_b = idx_b[torch.randperm(n_b, generator=gen)[:keep_b].sort().values]
    return pick_a, pick_b


@torch.no_grad()
def per_source_accuracy(model: nn.Module, dataset: MixedDataset, batch_size: int = 256,
                        device: torch.device | str | None = None) -> dict[str, float]:
    """Top-1 accuracy (eval mode) on each source's part of ``dataset`` and on the whole, keyed by
    source name and ``"all"``. The prediction is taken over the union label space."""
    if not isinstance(dataset, MixedDataset):
        raise ValueError(f"dataset={type(dataset).__name__} is not valid; allowed: a MixedDataset")
    if device is None:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64)
    try:
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            items = [dataset[i] for i in range(start, stop)]
            x = torch.stack([item[0] for item in items]).to(device)
            y = torch.tensor([item[1] for item in items])
            out = model(x)
            out = out["out"] if isinstance(out, dict) else out[0] if isinstance(out, (tuple, list)) else out
            hit = (out.argmax(1).cpu() == y).to(torch.int64)
            correct += torch.bincount(dataset.sources[start:stop], weights=hit, minlength=2).to(torch.int64)
    finally:
        model.train(was_training)
    totals = torch.bincount(dataset.sources, minlength=2)
    result = {name: float(correct[s]) / max(int(totals[s]), 1) for s, name in enumerate(dataset.source_names)}
    result["all"] = float(correct.sum()) / max(len(dataset), 1)
    return result


def mixed_digits(split: str, shift: str | Callable[[Tensor], Tensor] = "invert", augment: bool = False,
                 label_mode: str = "shared", proportion: float | None = None, seed: int = 0) -> MixedDataset:
    """The default mix-dataset attack: the embedded digits mixed with a ``shift``-ed copy of them
    (same split), labels shared. Sources are named ``"digits"`` and ``"digits-<shift>"``."""
    from workbench.data import get_dataset

    base = get_dataset("digits", split, augment=augment)
    shifted = ShiftedDataset(get_dataset("digits", split, augment=augment), shift)
    return MixedDataset(base, shifted, label_mode=label_mode, proportion=proportion, names=("digits", shifted.name),
                        seed=seed)


class SourceBatchSampler(Sampler[list[int]]):
    """Batches drawn from one source at a time: the control for the mix-dataset attack.

    The same items and the same number of optimiser steps as a shuffled loader over the
    :class:`MixedDataset`, but every batch holds a single source, so batch statistics never mix
    distributions. Batch order is shuffled across sources; each pass (epoch) reshuffles, from
    ``(seed, pass index)``, so runs are reproducible. Incomplete batches are dropped.
    """

    def __init__(self, sources: Tensor, batch_size: int, seed: int = 0) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not valid; allowed: an integer >= 1")
        self.sources = torch.as_tensor(sources, dtype=torch.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for s in torch.unique(self.sources).tolist():
            idx = torch.nonzero(self.sources == s).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            batches += [idx[i:i + self.batch_size].tolist()
                        for i in range(0, len(idx) - self.batch_size + 1, self.batch_size)]
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in order]

    def __iter__(self):
        batches = self._batches(self.epoch)
        self.epoch += 1  # a DataLoader never calls set_epoch on its batch sampler
        yield from batches

    def __len__(self) -> int:
        return sum(int((self.sources == s).sum()) // self.batch_size for s in torch.unique(self.sources).tolist())
