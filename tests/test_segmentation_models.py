"""Segmentation networks: output shapes in eval/train, aux outputs, norm choice, bad options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.models.segmentation import SEGMENTATION_MODELS, SegNet

NAMES = sorted(SEGMENTATION_MODELS)
WIDTH = {"segnet": 0.125, "pspnet_resnet18": 0.125, "pspnet_resnet50": 0.0625, "pspnet_resnet101": 0.0625,
         "icnet": 0.125}


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return SEGMENTATION_MODELS[name](11, width=WIDTH[name], **kwargs)


@pytest.mark.parametrize("norm", ["bn", "iebn"])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_eval_and_train(name: str, norm: str) -> None:
    model = build(name, norm=norm)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 11, 64, 64)

    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    if name == "segnet":
        assert isinstance(out, torch.Tensor) and out.shape == (2, 11, 64, 64)
    else:
        assert set(out) == {"out", "aux"}
        assert out["out"].shape == (2, 11, 64, 64)
        aux = out["aux"] if isinstance(out["aux"], list) else [out["aux"]]
        assert len(aux) == (2 if name == "icnet" else 1)
        assert all(a.shape == (2, 11, 64, 64) for a in aux)
        loss = out["out"].sum() + sum(a.sum() for a in aux)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_iebn_norm_replaces_every_bn(name: str) -> None:
    from workbench.nn import IEBN2d

    model = build(name, norm="iebn")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, IEBN2d) for m in norms)


@pytest.mark.parametrize("name", ["segnet", "pspnet_resnet18", "icnet"])
def test_odd_input_size(name: str) -> None:
    model = build(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, 11, 50, 70)


def test_no_inplace_relu() -> None:
    for name in NAMES:
        model = build(name)
        assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules()), name


def test_full_size_segnet_matches_published_parameter_count() -> None:
    # CAP's table: SegNet 29.45M parameters (Cityscapes, 19 classes)
    n = sum(p.numel() for p in SegNet(19).parameters())
    assert abs(n / 1e6 - 29.45) < 0.01


def test_pspnet_dilation_gives_output_stride_8() -> None:
    model = build("pspnet_resnet18").eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 8, 8]


def test_cagm_sites_are_norm_layers() -> None:
    for name in NAMES:
        model = build(name)
        named = dict(model.named_modules())
        sites = model.cagm_sites()
        assert sites and all(isinstance(named[s], nn.BatchNorm2d) for s in sites), name
    psp = build("pspnet_resnet18")
    assert len(psp.cagm_sites()) == 4 + 4  # four backbone stages + four pyramid branches


def test_segnet_couplings_match_channels() -> None:
    model = build("segnet")
    pairs = model.pruning_couplings()
    assert len(pairs) == 4
    assert all(a.num_features == b.num_features for a, b in pairs)


@pytest.mark.parametrize("kwargs", [{"norm": "gn"}, {"norm": "none"}, {"width": 0}, {"width": -1.0},
                                    {"in_channels": 0}])
def test_bad_options(kwargs: dict) -> None:
    for name in NAMES:
        with pytest.raises(ValueError):
            SEGMENTATION_MODELS[name](11, **kwargs)
    with pytest.raises(ValueError):
        SEGMENTATION_MODELS["segnet"](0)


def test_registered_in_build_model() -> None:
    from workbench.models import build_model, list_models

    assert set(NAMES) <= set(list_models())
    model = build_model("pspnet_resnet18", num_classes=5, width=0.125, norm="iebn")
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)
    with pytest.raises(ValueError):
        build_model("segnet", num_classes=5, attention="se")
