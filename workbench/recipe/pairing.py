"""Pairing of arms on a seed: one seed fixes the initial weights, the batch order and the noise
draws of every arm, so the per-seed difference between arms measures the arms, not the luck.

- **Initial weights**: :func:`paired_models` builds the reference arm (the first) under
  ``seed``, then every other arm under the same seed, and copies into each of them the reference's
  tensors whose name and shape match (:func:`share_initial_weights`). A BN network and its IEBN
  twin therefore start from identical convolutions, BN scales and classifier; only tensors the
  reference lacks (IEBN's ``attn_weight``/``attn_bias``, an SE block) keep their own seeded init.
  After building, the global generators are re-seeded with ``seed``, so augmentation draws made
  from them start from the same state in every arm.
- **Batch order**: :func:`paired_loader` is :func:`workbench.data.make_loader` with the loader's
  own generator seeded by ``seed`` (order per epoch from ``(seed, epoch)``).
- **Noise draws**: :func:`workbench.noise.batch_stat_noise` draws from ``(seed, step, layer,
  call)``; pass it the same ``seed`` in every arm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from workbench.data import make_loader
from workbench.device import seed_everything


@dataclass
class SharedWeights:
    """What :func:`share_initial_weights` did: names copied from the reference, names kept."""

    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@torch.no_grad()
def share_initial_weights(reference: nn.Module, other: nn.Module) -> SharedWeights:
    """Copy every tensor of ``reference``'s ``state_dict`` into ``other`` where ``other`` has a tensor
    of the same name and shape (parameters and buffers); the others of ``other`` are kept."""
    source = reference.state_dict()
    shared = SharedWeights()
    for name, tensor in other.state_dict().items():
        match = source.get(name)
        if match is not None and match.shape == tensor.shape and match.dtype == tensor.dtype:
            tensor.copy_(match)
            shared.copied.append(name)
        else:
            shared.kept.append(name)
    return shared


def paired_models(build: Callable[[str], nn.Module], arms: Sequence[str], seed: int) -> dict[str, nn.Module]:
    """``{arm: model}`` built by ``build(arm)`` under ``seed``, the non-reference arms starting from the
    reference arm's (``arms[0]``) tensors where names and shapes match; see the module docstring."""
    arms = list(arms)
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"arms={arms!r} is not valid; allowed: distinct arm names, the reference first")
    models: dict[str, nn.Module] = {}
    for arm in arms:
        seed_everything(seed)
        models[arm] = build(arm)
        if arm != arms[0]:
            share_initial_weights(models[arms[0]], models[arm])
    seed_everything(seed)
    return models


def paired_loader(dataset: Dataset, batch_size: int, seed: int, **options) -> DataLoader:
    """The training loader of one seed: the same batches in the same order for every arm."""
    return make_loader(dataset, batch_size, train=True, seed=seed, **options)
