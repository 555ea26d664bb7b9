"""The norm toolkit: one factory (create_norm / get_norm_layer), one finder (norm_layers), predicates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.models import build_model
from workbench.nn import IEBN2d, SyncIEBN2d, convert_bn_to_iebn
from workbench.nn.norms import (
    NORM_KINDS,
    create_norm,
    get_norm_layer,
    is_affine_norm,
    is_identity_norm,
    is_iebn,
    is_norm,
    norm_layers,
)


def test_create_norm_kinds() -> None:
    assert NORM_KINDS == ("bn", "iebn", "none")
    bn = create_norm("bn", 8, eps=1e-3, momentum=0.2)
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 8 and bn.eps == 1e-3 and bn.momentum == 0.2
    iebn = create_norm("iebn", 5)
    assert type(iebn) is IEBN2d and iebn.attn_weight.shape == (5,)
    none = create_norm("none", 8)
    assert type(none) is nn.Identity
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(none(x), x)


def test_get_norm_layer_and_identity() -> None:
    assert get_norm_layer("bn") is nn.BatchNorm2d and get_norm_layer("iebn") is IEBN2d
    assert is_identity_norm(get_norm_layer("none")) and is_identity_norm(None)
    assert not is_identity_norm(get_norm_layer("bn"))


@pytest.mark.parametrize("kind", ["BN", "layernorm", "", None, 3])
def test_create_norm_refuses_unknown_kind(kind) -> None:
    with pytest.raises(ValueError, match=r"norm=.* is not valid; allowed: \('bn', 'iebn', 'none'\)"):
        create_norm(kind, 4)


def test_get_norm_layer_restricted_kinds() -> None:
    assert get_norm_layer("iebn", allowed=("bn", "iebn")) is IEBN2d
    with pytest.raises(ValueError, match=r"norm='none' is not valid; allowed: \('bn', 'iebn'\)"):
        get_norm_layer("none", allowed=("bn", "iebn"))
    with pytest.raises(ValueError, match="norm='none' is not valid"):
        build_model("segnet", num_classes=3, norm="none", width=0.25)


def test_predicates() -> None:
    plain, frozen, iebn = nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False), IEBN2d(4)
    sync_iebn = SyncIEBN2d.from_iebn(iebn)
    assert is_norm(plain) and is_norm(frozen) and is_norm(iebn) and is_norm(nn.BatchNorm1d(3))
    assert not is_norm(nn.Conv2d(1, 1, 1)) and not is_norm(nn.Identity()) and not is_norm(nn.LayerNorm(4))
    assert is_affine_norm(plain) and not is_affine_norm(frozen)
    assert is_iebn(iebn) and not is_iebn(plain)
    assert is_iebn(sync_iebn) and is_norm(sync_iebn)


def _toy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 1), IEBN2d(4), nn.BatchNorm2d(4, affine=False)))


def test_norm_layers_finds_in_order() -> None:
    model = _toy()
    assert list(norm_layers(model)) == ["1", "3.1", "3.2"]
    assert list(norm_layers(model, predicate=is_affine_norm)) == ["1", "3.1"]
    assert list(norm_layers(model, predicate=is_iebn)) == ["3.1"]
    assert list(norm_layers(model, "3.*")) == ["3.1", "3.2"]
    assert list(norm_layers(model, ["3.2", "1"])) == ["1", "3.2"]  # definition order, not pattern order
    assert norm_layers(model)["3.1"] is model[3][1]


def test_norm_layers_on_a_model_without_norms() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert norm_layers(model) == {}
    with pytest.raises(ValueError, match=r"model=Sequential has no batch-normalisation layer; allowed"):
        norm_layers(model, required=True)
    with pytest.raises(ValueError, match="has no batch-normalisation layer"):
        norm_layers(model, "0")


@pytest.mark.parametrize("patterns", [[], 5, ["1", 2]])
def test_norm_layers_refuses_bad_patterns(patterns) -> None:
    with pytest.raises(ValueError, match=r"layers=.* is not valid; allowed: None, a name or fnmatch pattern"):
        norm_layers(_toy(), patterns)


def test_norm_layers_names_the_missing_pattern() -> None:
    with pytest.raises(ValueError, match=r"layers pattern 'layer9\.\*' matches no normalisation layer.*'3\.1'"):
        norm_layers(_toy(), ["1", "layer9.*"])


def test_norm_layers_on_built_and_converted_models() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, norm="iebn", width=0.25)
    iebn = norm_layers(model, predicate=is_iebn)
    # The projection-shortcut BNs stay plain BN (official placement): every other norm is IEBN.
    assert set(norm_layers(model)) - set(iebn) == {"layer2.0.downsample.bn", "layer3.0.downsample.bn"}
    assert norm_layers(build_model("resnet20", num_classes=10, norm="none", width=0.25)) == {}
    converted = convert_bn_to_iebn(build_model("resnet20", num_classes=10, norm="bn", width=0.25))
    assert set(norm_layers(converted, predicate=is_iebn)) == set(norm_layers(converted))


def test_cifar_blocks_take_an_injected_norm_layer() -> None:
    from workbench.models.cifar_resnet import BasicBlock, Bottleneck, PreActBottleneck

    class Marked(nn.BatchNorm2d):
        pass

    block = BasicBlock(8, 16, 2, norm_layer=Marked, shortcut_norm_layer=nn.BatchNorm2d)
    assert type(block.bn1) is Marked and type(block.bn2) is Marked and block.conv1.bias is None
    assert type(block.downsample.bn) is nn.BatchNorm2d
    assert type(Bottleneck(8, 4, 1, norm_layer=Marked).downsample.bn) is Marked  # shortcut defaults to norm_layer
    bare = Bottleneck(8, 4, 1, norm_layer=nn.Identity)
    assert bare.conv1.bias is not None and bare.downsample.conv.bias is not None
    pre = PreActBottleneck(8, 4, 1, norm_layer=Marked, attention="dia")
    assert type(pre.bn1) is Marked and type(pre.bn_additional) is Marked and len(pre.downsample) == 1
    assert block(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
