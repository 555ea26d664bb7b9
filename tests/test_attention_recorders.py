"""Attention and DIA-LSTM recorders: shapes, hook hygiene, bit-identical outputs, recorded maths."""

import json

import pytest
import torch
from torch import nn

from workbench.nn import IEBN2d
from workbench.nn.probe import AttentionProbe
from workbench.probes.attention import (
    AttentionAccumulator,
    AttentionMonitor,
    AttentionRecorder,
    attention_sites,
    collect_attention,
)

WIDTH = 0.25


def _build(name, norm="bn", attention="none", **kw):
    from workbench.models import build_model

    torch.manual_seed(0)
    return build_model(name, num_classes=10, norm=norm, attention=attention, width=WIDTH, **kw)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _randomise_gates(model):
    """Trained-looking gates: IEBN's attn_weight is 0 at init, which makes every gate 0.269."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, IEBN2d):
            with torch.no_grad():
                m.attn_weight.copy_(torch.randn(m.attn_weight.shape, generator=g))


class SharedProbeNet(nn.Module):
    """One probe applied by two blocks, as a module shared across blocks would."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Linear(4, 4)
        self.probe = AttentionProbe("dia")

    def forward(self, x):
        for _ in range(2):
            x = self.conv(x) if x.shape[1] == 3 else x
            a = self.probe(torch.sigmoid(self.gate(x.mean((2, 3)))))
            x = x * a[..., None, None]
        return x.mean((2, 3))


@pytest.mark.parametrize("name", ["resnet20", "resnet164"])
@pytest.mark.parametrize("norm,attention,kinds", [("iebn", "none", {"iebn"}), ("bn", "se", {"se"}),
                                                  ("bn", "dia", {"dia"}), ("iebn", "dia", {"iebn", "dia"})])
def test_recorder_shapes(name, norm, attention, kinds):
    model = _build(name, norm, attention).eval()
    sites = attention_sites(model)
    assert set(sites.values()) == kinds
    x = torch.randn(3, 3, 16, 16)
    rec = AttentionRecorder(model)
    with rec:
        model(x)
        model(x[:2])
    att = rec.attention
    assert att, "nothing recorded"
    channels = {}
    for m_name, m in model.named_modules():
        if isinstance(m, IEBN2d):
            channels[m_name] = m.num_features
    for key, a in att.items():
        assert a.dim() == 2 and a.shape[0] == 5, key
        assert torch.all((a >= 0) & (a <= 1)), key  # sigmoid gates (may saturate in float32 at init)
        if key in channels:
            assert a.shape[1] == channels[key]
    n_blocks = {"resnet20": 9, "resnet164": 54}[name]
    if "se" in kinds:
        assert sum(1 for k in att if attention_sites(model).get(k.split("[")[0]) == "se") == n_blocks
    if "dia" in kinds:
        assert sum(1 for k in att if attention_sites(model).get(k.split("[")[0]) == "dia") == n_blocks
    if "iebn" in kinds:
        per_block = {"resnet20": 2, "resnet164": 3}[name]
        assert sum(1 for k in att if sites.get(k) == "iebn") == n_blocks * per_block + 1  # + stem


@pytest.mark.parametrize("norm,attention", [("iebn", "none"), ("bn", "se"), ("bn", "dia")])
def test_outputs_bit_identical_and_hooks_removed(norm, attention):
    model = _build("resnet20", norm, attention)
    _randomise_gates(model)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    before = _hook_count(model)
    ref = model(x)
    with AttentionRecorder(model) as rec:
        assert _hook_count(model) > before
        out = model(x)
    assert torch.equal(out, ref)
    assert _hook_count(model) == before
    assert rec.attention  # recorded values survive the exit
    # training mode too (batch statistics), from the same state
    model.train()
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    model.load_state_dict(state)
    with AttentionRecorder(model):
        out = model(x)
    # A hooked IEBN gate must be a graph tensor, so a recorded IEBN trains through the unfused
    # ATen-op path instead of the fused CPU kernel: equal up to float32 rounding, not bitwise.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if not any(isinstance(m, IEBN2d) for m in model.modules()):
        assert torch.equal(out, ref)


def test_hooks_removed_after_exception():
    model = _build("resnet20", "iebn", "se").eval()
    before = _hook_count(model)
    rec = AttentionRecorder(model)
    with pytest.raises(RuntimeError, match="boom"):
        with rec:
            model(torch.randn(2, 3, 16, 16))
            raise RuntimeError("boom")
    assert _hook_count(model) == before and not rec.active
    with pytest.raises(RuntimeError), rec:  # a bad forward inside the recorder
        model(torch.randn(2, 5, 32, 32))
    assert _hook_count(model) == before


def test_recorder_cannot_be_entered_twice():
    model = _build("resnet20", "iebn")
    rec = AttentionRecorder(model)
    with rec:
        with pytest.raises(RuntimeError, match="already active"):
            rec.__enter__()
    assert not rec.active


def test_bad_layer_lists_available_and_no_sites_says_so():
    model = _build("resnet20", "iebn")
    with pytest.raises(ValueError, match=r"not found.*available: .*layer1\.0\.bn1"):
        AttentionRecorder(model, layers=["layer9.bn"])
    with pytest.raises(ValueError, match="has no attention sites"):
        AttentionRecorder(_build("resnet20", "bn", "none"))
    with pytest.raises(ValueError, match=r"no attention sites of kind se \(it has: iebn\)"):
        AttentionRecorder(model, kinds="se")
    with pytest.raises(ValueError, match="kinds"):
        AttentionRecorder(model, kinds="lstm")


def test_layer_selection_by_site_or_probe_name():
    model = _build("resnet20", "iebn").eval()
    first = next(iter(attention_sites(model)))
    rec = AttentionRecorder(model, layers=[first])
    assert list(rec.attribute(torch.randn(2, 3, 16, 16))) == [first]
    probe_name = next(n for n, m in model.named_modules() if isinstance(m, AttentionProbe))
    assert list(AttentionRecorder(model, layers=probe_name).probes) == [first]


def test_shared_probe_is_recorded_per_call():
    net = SharedProbeNet()
    rec = AttentionRecorder(net)
    with rec:
        net(torch.randn(2, 3, 8, 8))
        net(torch.randn(3, 3, 8, 8))
    att = rec.attention
    assert set(att) == {"probe[0]", "probe[1]"} and att["probe[0]"].shape == (5, 4)


def test_accumulator_matches_direct_statistics():
    torch.manual_seed(0)
    a = torch.rand(50, 6)
    t = torch.randint(0, 3, (50,))
    acc = AttentionAccumulator(num_classes=4, keep=20, quantile_levels=(0.5,))
    for i in range(0, 50, 16):
        acc.update({"l": a[i:i + 16]}, t[i:i + 16])
    s = acc.result({"l": "se"})
    assert s.count == 50 and s.kinds == {"l": "se"}
    torch.testing.assert_close(s.mean["l"], a.mean(0))
    torch.testing.assert_close(s.std["l"], a.std(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.class_mean["l"][1], a[t == 1].mean(0))
    assert torch.isnan(s.class_mean["l"][3]).all() and s.class_count.tolist()[3] == 0
    assert s.samples["l"].shape == (20, 6) and s.sample_targets.tolist() == t[:20].tolist()
    torch.testing.assert_close(s.quantiles["l"][0], a[:20].quantile(0.5, dim=0))
    json.dumps(s.to_dict())
    with pytest.raises(ValueError, match="targets"):
        acc.update({"l": a[:2]})


def test_collect_attention_over_loader():
    model = _build("resnet20", "iebn", "se")
    _randomise_gates(model)
    model.train()
    loader = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]
    stats = collect_attention(model, loader, num_classes=10, max_samples=10)
    assert model.training  # mode restored
    assert stats.count == 10
    layer = stats.layers[0]
    c = stats.mean[layer].shape[0]
    assert stats.std[layer].shape == (c,) and stats.quantiles[layer].shape == (5, c)
    assert stats.class_mean[layer].shape == (10, c) and stats.samples[layer].shape == (10, c)
    assert set(stats.kinds.values()) == {"iebn", "se"}
    assert all(v >= 0 for v in stats.spread().values())


def test_attention_monitor_logs_on_schedule(tmp_path):
    from workbench.train import fit

    model = _build("resnet20", "iebn")
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]
    path = tmp_path / "attention.json"
    before = _hook_count(model)
    with AttentionMonitor(model, every=2, path=str(path), kinds="iebn") as monitor:
        fit(model, data, epochs=1, callbacks=[monitor], device="cpu", progress=False)
    assert _hook_count(model) == before
    assert [e["step"] for e in monitor.records] == [0, 2]
    logged = json.loads(path.read_text())
    assert logged["probe"] == "attention" and set(logged["config"]["kinds"].values()) == {"iebn"}
    entry = logged["records"][0]["layers"]
    first = next(iter(entry))
    assert len(entry[first]["mean"]) == len(entry[first]["std"])
    with pytest.raises(ValueError, match="every"):
        AttentionMonitor(model, every=0)


# ----------------------------------------------------------------------------------------------
# DIA-LSTM recorder


@pytest.mark.parametrize("name,blocks", [("resnet20", 3), ("resnet164", 18)])
def test_dia_recorder_gates_and_states(name, blocks):
    from workbench.probes.dia import DIARecorder, gate_summary

    model = _build(name, "bn", "dia").eval()
    x = torch.randn(3, 3, 16, 16)
    ref = model(x)
    with DIARecorder(model) as rec, AttentionRecorder(model, kinds="dia") as att_rec:
        out = model(x)
    assert torch.equal(out, ref)
    assert _hook_count(model) == 0
    states = rec.states()
    assert list(states) == ["layer1", "layer2", "layer3"]
    assert list(DIARecorder(torch.compile(model)).cells) == list(states)  # no "_orig_mod." prefix
    attention = att_rec.attention
    for stage, per_block in states.items():
        assert len(per_block) == blocks
        channels = getattr(model, stage).dia.channels
        c_prev = torch.zeros(3, channels)
        for b, s in enumerate(per_block):
            assert set(s) == {"i", "f", "g", "o", "c", "h"}
            assert all(v.shape == (3, channels) for v in s.values())
            for gate in ("i", "f", "o"):
                assert torch.all((s[gate] > 0) & (s[gate] < 1)), (stage, b, gate)
            assert torch.all(s["g"].abs() < 1)
            torch.testing.assert_close(s["h"], s["o"] * torch.sigmoid(s["c"]), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(s["c"], s["f"] * c_prev + s["i"] * s["g"], rtol=1e-6, atol=1e-7)
            assert torch.equal(s["h"], attention[f"{stage}.{b}"])  # the h the block really applied
            c_prev = s["c"]
    summary = gate_summary(states)
    assert len(summary["gates"]["layer1"]["f"]) == blocks and len(summary["norms"]["layer2"]["h"]) == blocks
    assert all(0 < v < 1 for v in summary["gates"]["layer3"]["o"])


def test_dia_recorder_errors_and_exception_cleanup():
    from workbench.probes.dia import DIARecorder

    model = _build("resnet20", "bn", "dia")
    with pytest.raises(ValueError, match=r"not found.*available: layer1, layer2, layer3"):
        DIARecorder(model, stages="layer7")
    with pytest.raises(ValueError, match="no DIA-LSTM cell"):
        DIARecorder(_build("resnet20", "bn", "se"))
    rec = DIARecorder(model, stages=["layer2"])
    with pytest.raises(ZeroDivisionError), rec:
        model(torch.randn(2, 3, 16, 16))
        raise ZeroDivisionError
    assert _hook_count(model) == 0 and not rec.active
    assert list(rec.states()) == ["layer2"]
    states = rec.attribute(torch.randn(2, 3, 16, 16))
    assert states["layer2"][0]["h"].shape[0] == 2 and rec.states() == {}


@pytest.mark.gpu
def test_recordings_stay_on_the_gpu_until_reduced():
    from workbench.probes.dia import DIARecorder, gate_summary

    model = _build("resnet20", "iebn", "dia").to("cuda").eval()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    with AttentionRecorder(model) as rec, DIARecorder(model) as dia:
        model(x)
    assert all(a.is_cuda for a in rec.attention.values())
    assert all(t.is_cuda for blocks in dia.states().values() for b in blocks for t in b.values())
    loader = [(x, torch.tensor([0, 1, 2, 3], device="cuda"))]
    stats = collect_attention(model, loader, num_classes=10)
    assert all(not v.is_cuda for v in stats.mean.values()) and all(not v.is_cuda for v in stats.class_mean.values())
    assert isinstance(gate_summary(dia.states())["gates"]["layer1"]["i"][0], float)


def test_recorders_and_cagms_see_a_compiled_model():
    # dynamo skips hook guards by default: a hook added after compiling was never called, and a
    # recorder on a compiled model recorded nothing (workbench.nn.compiled.watch_hooks)
    import torch._dynamo

    from workbench.pruning.cagm import CAGM

    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # dynamo's default, restored after
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), IEBN2d(4), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
        _randomise_gates(net)
        compiled = torch.compile(net)
        x = torch.randn(2, 3, 6, 6)
        compiled(x)  # compiled before any hook exists
        with AttentionRecorder(net) as rec:
            compiled(x)
        assert list(rec.attention) == ["1"]
        torch.testing.assert_close(rec.attention["1"], AttentionRecorder(net).attribute(x)["1"])
        assert list(AttentionRecorder(compiled).probes) == ["1"]  # names of the module inside the wrapper
        rec.clear()
        compiled(x)
        assert rec.attention == {} and _hook_count(net) == 0  # removed hooks are gone from the graph too
        cagm = CAGM(net[4])
        compiled.train()(x)
        assert cagm.updates == 1
        cagm.remove()
        compiled(x)
        assert cagm.updates == 1
