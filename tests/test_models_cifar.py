"""CIFAR ResNet family: registry, every variant runs, placement of IEBN/SE/DIA, DIA state sharing."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from workbench.models import ATTENTIONS, NORMS, build_model, list_models, register_model
from workbench.models.cifar_resnet import BasicBlock, Bottleneck, PreActBottleneck, ResStage
from workbench.nn import DIALSTMCell, IEBN2d, SEModule, attention_probes

CIFAR_NAMES = ["resnet20", "resnet32", "resnet56", "resnet110", "resnet164", "preresnet164"]
WIDTH = 0.25
# The papers' counts for ResNet-164 on CIFAR-100 (counted from the IEBN and DIANet authors' model definitions).
PAPER_PARAMS = {("bn", "none"): 1_727_284, ("iebn", "none"): 1_751_508, ("bn", "dia"): 1_946_132}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(name, **options):
    torch.manual_seed(0)
    options.setdefault("width", WIDTH)
    return build_model(name, num_classes=10, **options)


def test_registry_lists_names_and_rejects_bad_input():
    names = list_models()
    for name in CIFAR_NAMES + ["segnet", "pspnet_resnet18", "icnet"]:
        assert name in names
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="norm"):
        build_model("resnet20", normalisation="bn")
    with pytest.raises(ValueError, match=r"norm='layer'.*'bn', 'iebn', 'none'"):
        build_model("resnet20", norm="layer")
    with pytest.raises(ValueError, match=r"attention='cbam'.*'none', 'se', 'dia'"):
        build_model("resnet20", attention="cbam")
    for bad in ({"width": 0}, {"width": "1"}, {"skip": 1}, {"in_channels": 0}, {"width": 0.1, "attention": "dia"}):
        with pytest.raises(ValueError):
            build_model("resnet20", **bad)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", num_classes=0)


def test_register_model_is_extensible():
    @register_model("tiny_test_net")
    def tiny(num_classes: int = 10, width: float = 1.0) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert "tiny_test_net" in list_models()
    assert build_model("tiny_test_net", num_classes=3).out_features == 3
    register_model("tiny_test_net")(tiny)  # same builder again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_test_net")(lambda num_classes=10: nn.Identity())


@pytest.mark.parametrize("name,norm,attention", list(itertools.product(CIFAR_NAMES, NORMS, ATTENTIONS)))
def test_every_variant_runs_forward_backward(name, norm, attention):
    model = _build(name, norm=norm, attention=attention)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    model.train()
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "preresnet164"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_without_skip_connections(name, attention):
    model = _build(name, attention=attention, skip=False, in_channels=1)
    assert not any(isinstance(m, nn.Module) and n.endswith("downsample") for n, m in model.named_modules())
    out = model(torch.randn(2, 1, 16, 16))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet164_parameter_counts_match_papers():
    for (norm, attention), expected in PAPER_PARAMS.items():
        model = build_model("resnet164", num_classes=100, norm=norm, attention=attention)
        assert _params(model) == expected
    assert _params(build_model("resnet164", num_classes=10)) == 1_704_154
    assert _params(build_model("resnet164", num_classes=10, attention="dia")) == 1_923_002


def test_depths_and_widths():
    def convs_on_main_path(model):
        return sum(1 for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n
                   and ".se." not in n)

    for name, depth in [("resnet20", 20), ("resnet56", 56), ("resnet110", 110), ("resnet164", 164)]:
        model = build_model(name, width=0.25)
        assert convs_on_main_path(model) + 1 == depth  # + the classifier
    model = build_model("resnet164")
    assert [model.layer1[0].conv3.out_channels, model.layer2[0].conv3.out_channels,
            model.layer3[0].conv3.out_channels] == [64, 128, 256]
    assert len(model.layer1) == 18 and isinstance(model.layer2[1], Bottleneck)
    assert isinstance(build_model("resnet32").layer3[-1], BasicBlock)
    assert build_model("resnet20", width=2.0).fc.in_features == 128


def test_iebn_placement_follows_official_code():
    model = _build("resnet164", norm="iebn")
    assert isinstance(model.stem.bn, IEBN2d)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            is_shortcut = "downsample" in name
            assert isinstance(m, IEBN2d) != is_shortcut, name
    assert type(model.layer2[0].downsample.bn) is nn.BatchNorm2d
    converted = _build("resnet164", norm="iebn", convert_shortcut_bn=True)
    assert isinstance(converted.layer2[0].downsample.bn, IEBN2d)
    basic = _build("resnet20", norm="iebn")
    assert isinstance(basic.layer1[0].bn1, IEBN2d) and type(basic.layer3[0].downsample.bn) is nn.BatchNorm2d
    pre = _build("preresnet164", norm="iebn", attention="dia")
    assert isinstance(pre.bn_final, IEBN2d) and isinstance(pre.layer1[0].bn_additional, IEBN2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pre.layer2[0].downsample.modules())


def test_norm_none_has_no_normalisation():
    model = _build("resnet56", norm="none")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.layer1[0].conv1.bias is not None


def test_preresnet_extra_bn_only_with_dia():
    assert _build("preresnet164", attention="dia").layer1[3].bn_additional is not None
    assert _build("preresnet164").layer1[3].bn_additional is None
    assert isinstance(_build("preresnet164", attention="se").layer1[0], PreActBottleneck)


def test_attention_probes_per_block():
    for name in ["resnet20", "resnet164", "preresnet164"]:
        se = _build(name, attention="se")
        blocks = [b for stage in se.stages() for b in stage]
        assert len(attention_probes(se, "se")) == len(blocks)
        assert all(isinstance(b.se, SEModule) for b in blocks)
        dia = _build(name, attention="dia")
        probes = attention_probes(dia, "dia")
        assert list(probes) == [f"layer{s}.{b}.attention_probe" for s in (1, 2, 3) for b in range(len(dia.layer1))]
        iebn = _build(name, norm="iebn")
        assert len(attention_probes(iebn, "iebn")) == sum(isinstance(m, IEBN2d) for m in iebn.modules())
        assert not attention_probes(_build(name), None)


def test_no_inplace_ops_for_attribution():
    model = _build("resnet164", norm="iebn", attention="se")
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_dia_one_shared_cell_per_stage_with_state_passed_along():
    model = _build("resnet20", attention="dia").eval()
    cells = [m for m in model.modules() if isinstance(m, DIALSTMCell)]
    assert len(cells) == 3 and all(isinstance(s.dia, DIALSTMCell) for s in model.stages())
    assert [c.channels for c in cells] == [4, 8, 16]
    # One parameter set per stage, independent of depth.
    deeper = _build("resnet56", attention="dia")
    cell_params = sum(_params(c) for c in cells)
    assert sum(_params(m) for m in deeper.modules() if isinstance(m, DIALSTMCell)) == cell_params
    assert _params(deeper) - _params(_build("resnet56")) == cell_params

    calls = []
    handle = model.layer2.dia.register_forward_hook(
        lambda cell, args, out: calls.append((args[0], args[1], out)))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert len(calls) == len(model.layer2)
    h0, c0 = calls[0][1]
    assert torch.all(h0 == 0) and torch.all(c0 == 0) and h0.shape == (3, 8)
    for previous, current in zip(calls, calls[1:]):
        assert current[1][0] is previous[2][0] and current[1][1] is previous[2][1]


def test_dia_stage_matches_the_formula():
    model = _build("resnet164", attention="dia").eval()
    stage = model.layer2
    x = torch.randn(2, model.layer1[0].conv3.out_channels, 8, 8)
    with torch.no_grad():
        expected = x
        h = c = torch.zeros(2, stage.dia.channels)
        for block in stage:
            branch, identity = block.residual(expected)
            z = branch.mean((2, 3))
            i, f, g, o = (stage.dia.phi_ih(z) + stage.dia.phi_hh(h)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.sigmoid(c)
            expected = torch.relu(branch * h[:, :, None, None] + identity)
        torch.testing.assert_close(stage(x), expected)


def test_zero_init_residual():
    model = _build("resnet20", zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for s in model.stages() for b in s)
    pre = _build("preresnet164", zero_init_residual=True)
    assert torch.all(pre.layer1[1].conv3.weight == 0)
    # Identity blocks start as identities (post-activation: relu of a non-negative input).
    block = model.layer1[1].eval()
    x = torch.rand(2, block.conv1.in_channels, 8, 8)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("name,norm,attention", [("resnet20", "iebn", "dia"), ("preresnet164", "bn", "se"),
                                                 ("resnet164", "iebn", "none")])
def test_state_dict_round_trip(name, norm, attention):
    model = _build(name, norm=norm, attention=attention)
    model(torch.randn(4, 3, 16, 16))  # move the running statistics
    torch.manual_seed(123)
    clone = build_model(name, num_classes=10, norm=norm, attention=attention, width=WIDTH)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 16, 16)
    for mode in (False, True):
        model.train(mode)
        clone.train(mode)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_stage_indexing():
    stage = _build("resnet20").layer2
    assert isinstance(stage, ResStage) and len(stage) == 3
    assert stage[-1] is stage[2] and list(stage)[0] is stage[0]
    with pytest.raises(IndexError):
        stage[3]
    assert dict(_build("resnet20").named_modules())["layer2.1.bn2"] is not None


def _param_table_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "param_table.py"
    spec = importlib.util.spec_from_file_location("param_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parents[1] / "README.md"


def test_param_table_script_and_readme_block():
    script, readme = _param_table_script()
    rows = script.param_counts()
    for row in rows:
        if row["paper"] is not None:
            assert abs(row["ours"] - row["paper"]) <= 0.02 * row["paper"], row
    table = script.markdown_table(rows)
    assert "1,751,508" in table and "n/a" in table
    text = readme.read_text() if readme.exists() else ""
    block = script.readme_block(text)
    if block is not None:
        assert block == table, "README parameter table is stale: run scripts/param_table.py --write README.md"
    replaced = script.replace_block(f"intro\n{script.START}\nold\n{script.END}\noutro\n", table)
    assert script.readme_block(replaced) == table and replaced.startswith("intro") and replaced.endswith("outro\n")
    with pytest.raises(ValueError):
        script.replace_block("no markers", table)
