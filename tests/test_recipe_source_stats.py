"""The mix-dataset control evaluated with fair BN statistics: per source, not the mixture's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from workbench.data.mixed import MixedDataset
from workbench.nn import IEBN2d
from workbench.recipe import evaluate_per_source, recalibrate_bn


class LevelImages(Dataset):
    """1x4x4 images at a per-sample level m (|m| in [0.5, 1.5]) plus pixel noise; label m > 0.
    ``scale``/``shift`` give the second source its very different input statistics."""

    num_classes, classes, task = 2, (0, 1), "classification"

    def __init__(self, n: int, seed: int, scale: float = 1.0, shift: float = 0.0, name: str = "a") -> None:
        g = torch.Generator().manual_seed(seed)
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        level = sign * (0.5 + torch.rand(n, generator=g))
        x = level.view(n, 1, 1, 1) + 0.3 * torch.randn(n, 1, 4, 4, generator=g)
        self.x, self.targets, self.name = shift + scale * x, (sign > 0).long(), name

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], int(self.targets[i])


def mixed(n: int, seed: int) -> MixedDataset:
    return MixedDataset(LevelImages(n, seed, name="a"), LevelImages(n, seed + 1, scale=3.0, shift=10.0, name="b"))


def control_model(train: MixedDataset, norm: str = "bn") -> nn.Module:
    """What single-source training leaves: a classifier of the normalised level, whose running
    statistics average the batches of both sources (cumulative average over alternating batches).
    The IEBN variant's gate is opened (attn_bias 10: gate ~1) so both norms classify alike."""
    layer = nn.BatchNorm2d(1, momentum=None) if norm == "bn" else IEBN2d(1, momentum=None)
    model = nn.Sequential(layer, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        if norm == "iebn":
            layer.attn_bias.fill_(10.0)
        model[3].weight.copy_(torch.tensor([[-5.0], [5.0]]))
        model[3].bias.zero_()
        model.train()
        for a, b in zip(DataLoader(train.source_subset(0), 32), DataLoader(train.source_subset(1), 32)):
            model(a[0])
            model(b[0])
    return model.eval()


@pytest.mark.parametrize("norm", ["bn", "iebn"])
def test_control_fails_with_mixture_statistics_and_passes_with_per_source_ones(norm):
    train, test = mixed(256, seed=0), mixed(128, seed=10)
    model = control_model(train, norm)
    # the running mean sits between the sources (0 and 10): it matches neither
    assert 3.0 < float(model[0].running_mean) < 7.0
    mixture = evaluate_per_source(model, test, statistics="mixture", batch_size=64)
    fair = evaluate_per_source(model, test, train, statistics="per_source", batch_size=64)
    for source in ("a", "b"):
        assert mixture[source]["acc"] <= 0.65, mixture
        assert fair[source]["acc"] >= 0.95, fair
        assert fair[source]["loss"] + 1.0 < mixture[source]["loss"]
        assert fair[source]["count"] == 128
    assert fair["all"]["acc"] == pytest.approx((fair["a"]["acc"] + fair["b"]["acc"]) / 2)


def test_recalibration_works_on_a_copy():
    train = mixed(64, seed=0)
    model = control_model(train)
    before = model[0].running_mean.clone()
    net = recalibrate_bn(model, DataLoader(train.source_subset(1), 32))
    assert torch.equal(model[0].running_mean, before) and not model.training
    assert float(net[0].running_mean) == pytest.approx(float(LevelImages(64, 1, 3.0, 10.0).x.mean()), abs=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"statistics": "per_source"}, r"calibration=None is not valid with statistics='per_source'"),
    ({"statistics": "running"}, r"statistics='running' is not valid; allowed: \('per_source', 'mixture'\)"),
    ({"statistics": "mixture", "batch_size": 1}, r"batch_size=1 is not valid; allowed: an integer >= 2"),
])
def test_bad_control_arguments_are_named(kwargs, message):
    test = mixed(16, seed=0)
    with pytest.raises(ValueError, match=message):
        evaluate_per_source(control_model(test), test, **kwargs)
