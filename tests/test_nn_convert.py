"""BatchNorm2d -> IEBN2d conversion and the IEBN-aware SyncBatchNorm conversion."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn

from workbench.models import build_model
from workbench.nn import IEBN2d, SyncBatchNorm2d, SyncIEBN2d, convert_bn_to_iebn, convert_sync_batchnorm


def test_convert_torchvision_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7).double()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference = copy.deepcopy(model)
    returned = convert_bn_to_iebn(model)
    assert returned is model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == n_bn and all(isinstance(m, IEBN2d) for m in bns)
    assert all(m.attn_weight.dtype == torch.float64 for m in bns)
    assert copy.deepcopy(model).eval()(x).shape == reference(x).shape == (2, 7)
    # Open every gate: the converted network computes exactly what the original did, running
    # statistics included.
    for m in bns:
        with torch.no_grad():
            m.attn_bias.fill_(60.0)
    reference = torchvision.models.resnet18(weights=None, num_classes=7).double()
    reference.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)
    model(x).sum().backward()
    assert all(m.attn_weight.grad is not None for m in bns)


def test_convert_keeps_tensors_skip_and_shared_modules():
    bn = nn.BatchNorm2d(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Sequential(nn.BatchNorm2d(4)), bn)
    weight = bn.weight
    convert_bn_to_iebn(net, skip=["2.0"])
    assert isinstance(net[1], IEBN2d) and net[1].weight is weight
    assert net[3] is net[1]
    assert type(net[2][0]) is nn.BatchNorm2d
    convert_bn_to_iebn(net, skip=lambda name, m: True)
    assert type(net[2][0]) is nn.BatchNorm2d
    assert isinstance(convert_bn_to_iebn(nn.BatchNorm2d(3)), IEBN2d)
    with pytest.raises(ValueError, match="skip"):
        convert_bn_to_iebn(net, skip="2.0")
    already = IEBN2d(4)
    assert convert_bn_to_iebn(already) is already


def test_convert_our_models():
    model = build_model("resnet20", width=0.25)
    convert_bn_to_iebn(model)
    assert isinstance(model.layer1[0].bn1, IEBN2d) and isinstance(model.layer2[0].downsample.bn, IEBN2d)
    model(torch.randn(2, 3, 16, 16)).sum().backward()


def test_sync_conversion_keeps_attention_parameters():
    model = build_model("resnet20", width=0.25, norm="iebn")
    iebn = model.layer1[0].bn1
    with torch.no_grad():
        iebn.attn_weight.fill_(0.5)
    converted = convert_sync_batchnorm(model)
    sync = converted.layer1[0].bn1
    assert isinstance(sync, SyncIEBN2d) and isinstance(sync, IEBN2d)
    assert sync.attn_weight is iebn.attn_weight and sync.weight is iebn.weight
    assert sync.running_mean is iebn.running_mean
    # On the CPU plain BN becomes our SyncBatchNorm2d (torch's SyncBatchNorm needs a GPU to run).
    assert type(converted.layer2[0].downsample.bn) is SyncBatchNorm2d
    assert convert_sync_batchnorm(converted) is converted
    # torch's own conversion would have dropped them: the reason this function exists.
    torch_converted = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet20", width=0.25, norm="iebn"))
    assert not hasattr(torch_converted.layer1[0].bn1, "attn_weight")


def test_sync_iebn_forward_on_a_single_process_group():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), IEBN2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1), IEBN2d(6),
                          nn.BatchNorm2d(6))
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, IEBN2d):
            with torch.no_grad():
                m.attn_weight.normal_()
    reference = copy.deepcopy(model)
    synced = convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced[1], SyncIEBN2d) and isinstance(synced[5], SyncBatchNorm2d)
    x = torch.randn(4, 3, 8, 8)
    store_dir = tempfile.mkdtemp()
    store = dist.FileStore(os.path.join(store_dir, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yr = synced(xs), reference(xr)
        torch.testing.assert_close(ys, yr, rtol=1e-5, atol=1e-5)
        ys.square().sum().backward()
        yr.square().sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(synced[1].attn_weight.grad, reference[1].attn_weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(synced[1].running_var, reference[1].running_var)
        torch.testing.assert_close(synced[5].running_var, reference[5].running_var)
        synced.eval()
        reference.eval()
        torch.testing.assert_close(synced(x), reference(x), rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
    # Without a process group it is an IEBN2d.
    synced.train()
    reference.train()
    torch.testing.assert_close(synced(x), reference(x), rtol=1e-5, atol=1e-5)
