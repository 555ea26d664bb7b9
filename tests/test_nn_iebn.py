"""IEBN2d against a literal transcription of the formula, BatchNorm2d semantics and its hook points."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import workbench.nn.functional as wf
import workbench.nn.iebn as iebn_module
from workbench.nn import IEBN2d, iebn_reference


def _randomised(channels: int = 5, dtype=torch.float64, **kwargs) -> IEBN2d:
    m = IEBN2d(channels, **kwargs).to(dtype)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1.0, 1.0)
        m.attn_weight.uniform_(-1.0, 1.0)
        m.attn_bias.uniform_(-1.0, 1.0)
    return m


def _batch_reference(m: IEBN2d, x: torch.Tensor) -> torch.Tensor:
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    return iebn_reference(x, mean, var, m.weight, m.bias, m.attn_weight, m.attn_bias, m.eps)


def _input(shape=(6, 5, 4, 3), dtype=torch.float64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2.0 + 0.5


def _observe(m: IEBN2d):
    """Force the general (unfused) path: a hook on the probe that changes nothing."""
    return m.attention_probe.register_forward_hook(lambda mod, args, out: None)


@pytest.fixture(params=["fused", "fused-python", "device-bn", "general", "composite", "generic-kernels"])
def path(request, monkeypatch):
    if request.param == "device-bn":
        # The accelerator path (device batch-norm kernel + gate), run here on the CPU.
        monkeypatch.setattr(iebn_module, "_use_device_batch_norm", lambda x: not wf.use_composite())
    if request.param in ("fused-python", "general", "composite", "generic-kernels"):
        # "fused" takes the C++ CPU kernel when it builds (it must here, see test_native_kernel_is_used);
        # the other paths test the pure-PyTorch code it falls back to.
        monkeypatch.setenv("WORKBENCH_NATIVE", "0")
    if request.param == "composite":
        monkeypatch.setattr(wf, "use_composite", lambda: True)
    if request.param == "generic-kernels":
        # The broadcasting ops used off the CPU (and for non-contiguous inputs).
        monkeypatch.setattr(wf, "_flat_view", lambda x: None)
    return request.param


def _prepare(m: IEBN2d, path: str):
    return _observe(m) if path == "general" else None


def test_defaults_and_parameter_layout():
    m = IEBN2d(7)
    assert isinstance(m, nn.BatchNorm2d)
    assert m.weight.shape == m.bias.shape == m.attn_weight.shape == m.attn_bias.shape == (7,)
    assert torch.all(m.attn_weight == 0) and torch.all(m.attn_bias == -1)
    assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert m.eps == 1e-5 and m.momentum == 0.1
    names = {n for n, _ in m.named_parameters()}
    assert names == {"weight", "bias", "attn_weight", "attn_bias"}
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                                   "attn_weight", "attn_bias"}


def test_train_forward_matches_formula(path):
    m = _randomised()
    _prepare(m, path)
    x = _input()
    torch.testing.assert_close(m(x), _batch_reference(m, x), rtol=1e-10, atol=1e-10)


def test_eval_forward_matches_formula_with_running_stats(path):
    m = _randomised()
    _prepare(m, path)
    x = _input()
    for seed in range(3):
        m(_input(seed=seed + 1))
    m.eval()
    expected = iebn_reference(x, m.running_mean, m.running_var, m.weight, m.bias, m.attn_weight, m.attn_bias,
                              m.eps)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    # The gate stays input dependent in eval mode: per-sample outputs differ from a batch-free BN.
    assert not torch.allclose(m(x[:1]), m(x[1:2]))


def test_gradients_match_formula_and_reach_all_parameters(path):
    m = _randomised()
    _prepare(m, path)
    x = _input().requires_grad_()
    grad_out = _input(seed=7)
    params = [x, m.weight, m.bias, m.attn_weight, m.attn_bias]
    got = torch.autograd.grad(m(x), params, grad_out)
    expected = torch.autograd.grad(_batch_reference(m, x), params, grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
        assert g.abs().sum() > 0


def test_eval_gradients_match_formula(path):
    m = _randomised()
    _prepare(m, path)
    m(_input(seed=3))
    m.eval()
    x = _input().requires_grad_()
    params = [x, m.weight, m.bias, m.attn_weight, m.attn_bias]
    got = torch.autograd.grad(m(x).square().sum(), params)
    ref = iebn_reference(x, m.running_mean, m.running_var, m.weight, m.bias, m.attn_weight, m.attn_bias, m.eps)
    expected = torch.autograd.grad(ref.square().sum(), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_reduces_to_batchnorm_with_open_gate(momentum, path):
    m = _randomised(momentum=momentum)
    _prepare(m, path)
    bn = nn.BatchNorm2d(5, momentum=momentum).double()
    with torch.no_grad():
        m.attn_weight.zero_()
        m.attn_bias.fill_(60.0)  # sigmoid(60) == 1 in float64 to the last bit that matters
        bn.weight.copy_(m.weight)
        bn.bias.copy_(m.bias)
    for seed in range(4):
        x = _input(seed=seed)
        torch.testing.assert_close(m(x), bn(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == 4
    m.eval()
    bn.eval()
    x = _input(seed=9)
    torch.testing.assert_close(m(x), bn(x), rtol=1e-10, atol=1e-10)


def test_no_running_stats_uses_batch_statistics_in_eval():
    m = _randomised(track_running_stats=False)
    m.eval()
    x = _input()
    assert m.running_mean is None
    torch.testing.assert_close(m(x), _batch_reference(m, x), rtol=1e-10, atol=1e-10)


def test_non_affine_layer():
    m = _randomised(affine=False)
    assert m.weight is None and m.bias is None
    x = _input().requires_grad_()
    torch.testing.assert_close(m(x), _batch_reference(m, x), rtol=1e-10, atol=1e-10)
    m(x).sum().backward()
    assert m.attn_weight.grad is not None


def test_from_batchnorm_preserves_output_up_to_attention_factor():
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn(_input(seed=1))
    bn.eval()
    m = IEBN2d.from_batchnorm(bn)
    assert m.weight is bn.weight and m.running_mean is bn.running_mean
    assert not m.training
    x = _input()
    factor = torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64))
    expected = (bn(x) - bn.bias.view(1, -1, 1, 1)) * factor + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="bn="):
        IEBN2d.from_batchnorm(nn.BatchNorm1d(5))


def test_state_dict_round_trip():
    m = _randomised()
    for seed in range(2):
        m(_input(seed=seed))
    clone = IEBN2d(5).double()
    clone.load_state_dict(copy.deepcopy(m.state_dict()))
    for mode in (True, False):
        m.train(mode)
        clone.train(mode)
        x = _input(seed=5)
        torch.testing.assert_close(clone(x), m(x), rtol=0, atol=0)


def test_batch_of_one_and_degenerate_input():
    m = IEBN2d(3)
    y = m(torch.randn(1, 3, 4, 4))
    assert y.shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError):
        m(torch.randn(2, 3, 4))


def test_float32_large_mean_is_accurate(path):
    """The one-pass E[x^2] - E[x]^2 would lose the variance here; the centred fallback (eager) and
    the shifted sums (composite) keep it."""
    m, bn = IEBN2d(4, momentum=1.0), nn.BatchNorm2d(4, momentum=1.0)
    _prepare(m, path)
    with torch.no_grad():
        m.attn_bias.fill_(60.0)
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.01 + 1000.0
    exact_var = x.double().var((0, 2, 3)).float()
    y, y_bn = m(x), bn(x)
    torch.testing.assert_close(m.running_var, exact_var, rtol=1e-3, atol=0)
    # The output itself is float32-limited like nn.BatchNorm2d's (which folds into x * s + t the
    # same way): a rounding of the mean is eps * |mean| / std ~ 6e-3 in normalised units here.
    exact = nn.functional.batch_norm(x.double(), None, None, training=True).float()
    assert (y - exact).abs().max() < 0.03 and (y_bn - exact).abs().max() < 0.03


def test_channels_last_and_low_precision_inputs():
    m = _randomised(dtype=torch.float32)
    x = _input(dtype=torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    torch.testing.assert_close(m(x), _batch_reference(m, ref_x), rtol=1e-5, atol=1e-5)
    m(x).square().sum().backward()
    _batch_reference(m, ref_x).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)
    y = m(_input(dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_gradcheck_fused_function():
    x = _input((3, 2, 3, 2)).requires_grad_()
    w, b, aw, ab = (torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(4))
    torch.autograd.gradcheck(lambda *a: wf.iebn_train_fused(*a, 1e-5)[0], (x, w, b, aw, ab))
    xc = _input((3, 2, 3, 2)).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.autograd.gradcheck(lambda *a: wf.iebn_train_fused(*a, 1e-5)[0], (xc, w, b, aw, ab))


def test_gradcheck_general_path_with_statistics_transform():
    x = _input((3, 2, 3, 2)).requires_grad_()
    w, b, aw, ab = (torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(4))
    xi = torch.randn(2, dtype=torch.float64)

    def f(x, w, b, aw, ab):
        moments = wf.plane_moments(x)
        mean = moments.batch_mean + 0.3 * moments.batch_var.sqrt() * xi
        var = moments.batch_var * torch.exp(0.2 * xi)
        gate = torch.sigmoid(aw * moments.mean + ab)
        return wf.gated_batch_norm(x, mean, var, w, b, 1e-5, gate, moments)

    torch.autograd.gradcheck(f, (x, w, b, aw, ab))
    # Plain BN through the same core (gate None, weight/bias None).
    torch.autograd.gradcheck(
        lambda x: wf.gated_batch_norm(x, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), None, None, 1e-5),
        (x,))


def test_stat_transform_hook():
    m = _randomised()
    x = _input()
    seen = []
    xi = torch.randn(5, dtype=torch.float64)

    def transform(mean, var):
        seen.append((mean.detach().clone(), var.detach().clone()))
        return mean + 0.5 * var.sqrt() * xi, var * 1.5

    clean = copy.deepcopy(m)
    y_clean = clean(x)
    m.stat_transform = transform
    y = m(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], x.mean((0, 2, 3)))
    torch.testing.assert_close(seen[0][1], x.var((0, 2, 3), unbiased=False))
    mean, var = transform(x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
    expected = iebn_reference(x, mean, var, m.weight, m.bias, m.attn_weight, m.attn_bias, m.eps)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    # Running statistics absorbed the clean statistics by default (to rounding: the unhooked layer
    # reduces in the C++ kernel, the hooked one in ATen ops).
    torch.testing.assert_close(m.running_mean, clean.running_mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(m.running_var, clean.running_var, rtol=1e-12, atol=1e-15)
    # Gradients flow through the transform.
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # Not called in eval mode.
    m.eval()
    m(x)
    assert len(seen) == 3
    # Optionally the running statistics absorb the transformed ones.
    m.train()
    noisy = copy.deepcopy(clean)
    noisy.stat_transform, noisy.stat_transform_updates_running_stats = transform, True
    before = noisy.running_mean.clone()
    noisy(x)
    torch.testing.assert_close(noisy.running_mean, 0.9 * before + 0.1 * mean, rtol=1e-12, atol=1e-12)
    # Removing it restores the layer exactly.
    m.stat_transform = None
    reference = copy.deepcopy(clean)
    reference.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), reference(x), rtol=0, atol=0)
    del y_clean


def test_attention_probe_sees_and_can_replace_the_gate():
    m = _randomised()
    x = _input()
    y_plain = m(x)
    captured = []
    handle = m.attention_probe.register_forward_hook(lambda mod, args, out: captured.append(out.detach()))
    y_hooked = m(x)
    handle.remove()
    torch.testing.assert_close(y_hooked, y_plain, rtol=1e-12, atol=1e-12)
    expected_gate = torch.sigmoid(m.attn_weight * x.mean((2, 3)) + m.attn_bias)
    torch.testing.assert_close(captured[0], expected_gate)
    assert captured[0].shape == (6, 5)
    # A hook that returns a tensor replaces the gate: an all-ones gate turns IEBN into BN.
    handle = m.attention_probe.register_forward_hook(lambda mod, args, out: torch.ones_like(out))
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.copy_(m.weight)
        bn.bias.copy_(m.bias)
    torch.testing.assert_close(m(x), bn(x), rtol=1e-10, atol=1e-10)
    handle.remove()


def test_compile_fullgraph_matches_eager():
    m = _randomised(dtype=torch.float32)
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for mode in (True, False):
        m.train(mode)
        eager.train(mode)
        x = _input(dtype=torch.float32).requires_grad_()
        xe = x.detach().clone().requires_grad_()
        y, ye = compiled(x), eager(xe)
        torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        ye.square().sum().backward()
        torch.testing.assert_close(x.grad, xe.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.attn_weight.grad, eager.attn_weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.running_var, eager.running_var)


def test_torch_func_grad_uses_transformable_path():
    m = _randomised()
    torch.func.replace_all_batch_norm_modules_(m)  # as the gradient-noise probes do, on a copy
    x = _input()
    params = dict(m.named_parameters())

    def loss(p):
        return torch.func.functional_call(m, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    expected = torch.autograd.grad(_batch_reference(m, x).square().sum(), list(params.values()))
    for g, e in zip(grads.values(), expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("observed", [False, True])
def test_cuda_matches_formula(observed):
    device = torch.device("cuda")
    m = _randomised(dtype=torch.float32).to(device)
    if observed:
        _observe(m)
    x = (torch.randn(8, 5, 6, 6, device=device) * 2 + 0.5).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    params = [m.weight, m.bias, m.attn_weight, m.attn_bias]
    got = torch.autograd.grad(m(x).square().sum(), [x, *params])
    expected = torch.autograd.grad(_batch_reference(m, xr).square().sum(), [xr, *params])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    m.eval()
    ref = iebn_reference(x, m.running_mean, m.running_var, m.weight, m.bias, m.attn_weight, m.attn_bias, m.eps)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_compiled_model_trains():
    from workbench.models import build_model

    model = build_model("resnet20", norm="iebn", attention="dia", width=0.5).to("cuda")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    eager_out = model(x)
    torch.testing.assert_close(compiled(x), eager_out, rtol=1e-3, atol=1e-3)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_device_batch_norm_path_non_affine_low_precision_and_gradcheck(monkeypatch):
    monkeypatch.setattr(iebn_module, "_use_device_batch_norm", lambda x: not wf.use_composite())
    m = _randomised(affine=False)
    x = _input()
    torch.testing.assert_close(m(x), _batch_reference(m, x), rtol=1e-10, atol=1e-10)
    m = _randomised(dtype=torch.float32)
    x = _input(dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x), _batch_reference(m, x), rtol=1e-5, atol=1e-5)
    y = m(_input(dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    m = _randomised()
    torch.autograd.gradcheck(lambda t: m(t), (_input((3, 5, 3, 2)).requires_grad_(),))
