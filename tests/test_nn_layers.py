"""SEModule, the DIA-LSTM cell and attention probes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.nn import AttentionProbe, DIALSTMCell, SEModule, attention_probes, dia_lstm_gates


def test_se_module_layout_and_math():
    se = SEModule(64)
    assert se.fc1.out_channels == 4 and se.fc2.out_channels == 64
    assert se.fc1.bias is not None and not se.act.inplace
    assert SEModule(16).fc1.out_channels == 1 and SEModule(8, reduction=4).fc1.out_channels == 2
    x = torch.randn(3, 64, 5, 5)
    s = x.mean((2, 3))
    hidden = torch.relu(s @ se.fc1.weight.flatten(1).T + se.fc1.bias)
    expected_att = torch.sigmoid(hidden @ se.fc2.weight.flatten(1).T + se.fc2.bias)
    seen = []
    se.attention_probe.register_forward_hook(lambda m, a, out: seen.append(out))
    y = se(x)
    torch.testing.assert_close(seen[0], expected_att)
    torch.testing.assert_close(y, x * expected_att[:, :, None, None])
    assert set(attention_probes(se)) == {"attention_probe"}
    for bad in ({"channels": 0}, {"channels": 4, "reduction": 0}):
        with pytest.raises(ValueError):
            SEModule(**bad)


def test_dia_cell_layout_and_math():
    cell = DIALSTMCell(16)
    assert [type(m) for m in cell.phi_ih] == [nn.Linear, nn.ReLU, nn.Linear]
    assert cell.phi_ih[0].out_features == 4 and cell.phi_hh[2].out_features == 64
    assert not cell.phi_hh[1].inplace and cell.phi_ih[0].bias is not None
    c_ = 16
    assert sum(p.numel() for p in cell.parameters()) == 2 * (c_ * c_ // 4 + c_ // 4 + c_ // 4 * 4 * c_ + 4 * c_)
    z, h, c = torch.randn(3, 16), torch.rand(3, 16), torch.randn(3, 16)
    gates = cell.phi_ih(z) + cell.phi_hh(h)
    i, f, g, o = gates[:, :16], gates[:, 16:32], gates[:, 32:48], gates[:, 48:]
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.sigmoid(c_new)
    h_out, c_out = cell(z, (h, c))
    torch.testing.assert_close(h_out, h_new)
    torch.testing.assert_close(c_out, c_new)
    step = dia_lstm_gates(cell, z, h, c)
    assert set(step) == {"i", "f", "g", "o", "c", "h"}
    torch.testing.assert_close(step["f"], torch.sigmoid(f))
    torch.testing.assert_close(step["g"], torch.tanh(g))
    assert torch.all((h_out > 0) & (h_out < 1))


def test_dia_cell_state_and_validation():
    cell = DIALSTMCell(8, reduction=2).double()
    z = torch.randn(1, 8, dtype=torch.float64)
    h0, c0 = cell.initial_state(z)
    assert h0.dtype == torch.float64 and h0.shape == (1, 8) and not h0.any() and not c0.any()
    h, c = cell(z, (h0, c0))
    h.sum().backward()
    assert all(p.grad is not None for p in cell.parameters())
    with pytest.raises(ValueError, match="z.shape"):
        cell(torch.randn(2, 7, dtype=torch.float64), (h0, c0))
    with pytest.raises(ValueError, match="reduction"):
        DIALSTMCell(3, reduction=4)


def test_attention_probe_is_a_parameter_free_identity():
    probe = AttentionProbe("se")
    x = torch.randn(2, 3)
    assert probe(x) is x and not list(probe.parameters()) and not probe.state_dict()
    with pytest.raises(ValueError, match="kind"):
        AttentionProbe("cbam")
    net = nn.Sequential(SEModule(8, 4), nn.Sequential(SEModule(8, 4)))
    assert list(attention_probes(net)) == ["0.attention_probe", "1.0.attention_probe"]
    assert attention_probes(net, "dia") == {}
    with pytest.raises(ValueError, match="kinds"):
        attention_probes(net, ("se", "x"))
