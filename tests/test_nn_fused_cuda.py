"""Fused CUDA IEBN: the Triton kernels' math under Triton's interpreter (CPU, in a subprocess), the
kernels through Triton's real compiler down to sm_90 machine code (no GPU needed), the switch and
the launch plan, and the real CUDA operator (gpu-marked: speed-independent correctness on a GPU,
compiled graphs, opcheck)."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import workbench.nn.fused_cuda as fc
from workbench.nn import IEBN2d, iebn_reference

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.slow  # a second Python process: ~40 s on one free core
def test_kernels_under_triton_interpreter_match_formula_and_batchnorm():
    """``tests/interpreted_fused_iebn.py`` in a process where Triton interprets its kernels on CPU
    tensors (the choice is made when Triton is imported, so it cannot share this process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("WORKBENCH_FUSED", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         str(ROOT / "tests" / "interpreted_fused_iebn.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 15 and "skipped" not in summary, summary


@pytest.mark.parametrize(("value", "mode"), [("1", "on"), ("", "on"), ("eager", "eager"), ("0", "off"),
                                             ("OFF", "off")])
def test_switch_values(monkeypatch, value, mode):
    monkeypatch.setenv("WORKBENCH_FUSED", value)
    assert fc.fused_mode() == mode


def test_switch_refuses_unknown_values(monkeypatch):
    monkeypatch.setenv("WORKBENCH_FUSED", "maybe")
    with pytest.raises(ValueError, match=r"WORKBENCH_FUSED='maybe' is not valid; allowed: 1/on, eager, 0/off"):
        fc.fused_mode()


def test_cpu_and_float64_inputs_keep_the_pytorch_ops(monkeypatch):
    assert not fc.use_fused_cuda(torch.zeros(2, 3, 4, 4))
    monkeypatch.setattr(fc, "_fusable", lambda x: x.dtype in fc.FUSED_DTYPES)
    assert fc.use_fused_cuda(torch.zeros(2, 3, 4, 4)) == fc.triton_available()
    assert not fc.use_fused_cuda(torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    monkeypatch.setenv("WORKBENCH_FUSED", "0")
    assert not fc.use_fused_cuda(torch.zeros(2, 3, 4, 4))


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("n", "c", "hw"), [(1, 3, 1), (128, 16, 1024), (128, 256, 64), (8, 64, 131072),
                                            (2, 70, 1023), (1, 1, 5)])
def test_sweep_plan_covers_every_plane_once(n, c, hw, channels_last):
    from workbench.nn.triton_iebn import sweep_plan

    plan = sweep_plan(n, c, hw, channels_last, 528)
    for block in (plan.block_c, plan.block_hw):
        assert block >= 1 and block & (block - 1) == 0
    assert plan.num_cb * plan.block_c >= c > (plan.num_cb - 1) * plan.block_c
    assert plan.chunk % plan.block_hw == 0
    assert plan.split * plan.chunk >= hw > (plan.split - 1) * plan.chunk  # no chunk empty, none missed
    assert 1 <= plan.num_warps <= 8
    if n * c * hw >= 528 * 2048:
        assert n * plan.num_cb * plan.split >= 528 // 2  # big activations fill the GPU


_ACTIVATION_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
_FLOAT_ARGS = {"eps", "inv_count", "unbias", "inv_hw"}


def _compile_for_hopper(kernel, constexprs: dict, dtype: str) -> None:
    """Triton's full compiler (TTIR -> PTX -> cubin with its bundled ptxas) for sm_90, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in _ACTIVATION_POINTERS else "*fp32"
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    try:
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    except TypeError as error:  # another Triton version's ASTSource
        pytest.skip(f"ASTSource of this Triton version differs: {error}")
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"]


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted in this process")
@pytest.mark.parametrize(("shape", "channels_last", "dtype"), [
    ((128, 16, 32, 32), False, "fp32"), ((128, 256, 8, 8), True, "bf16"), ((4, 70, 9, 9), False, "fp16"),
    ((3, 5, 1, 1), False, "fp32")])
def test_kernels_compile_for_hopper_without_a_gpu(shape, channels_last, dtype):
    """The interpreter runs the kernels' Python; this compiles them as a GPU would (types, layouts,
    loop-carried values), with the tiles and stride specialisations the launches use."""
    from workbench.nn import triton_iebn as kernels

    n, c, h, w = shape
    plan = kernels.sweep_plan(n, c, h * w, channels_last, 528)
    block_n, block_c = kernels._stats_blocks(n, c)
    unit = {"stride_c": 1, "gstride_c": 1} if channels_last else {"stride_hw": 1, "gstride_hw": 1}
    sweep = {"BLOCK_C": plan.block_c, "BLOCK_HW": plan.block_hw}
    stats = {"BLOCK_N": block_n, "BLOCK_C": block_c}
    cases = [(kernels._plane_moments, {**sweep, **unit}), (kernels._plane_affine, {**sweep, **unit}),
             (kernels._grad_sums, {**sweep, **unit}), (kernels._grad_input, {**sweep, **unit}),
             (kernels._forward_stats, {**stats, "HAS_WEIGHT": True, "HAS_BIAS": dtype != "fp16"}),
             (kernels._backward_stats, {**stats, "HAS_WEIGHT": dtype != "fp16"})]
    for kernel, constexprs in cases:
        names = set(kernel.arg_names)
        _compile_for_hopper(kernel, {k: v for k, v in constexprs.items() if k in names}, dtype)


# --- on a GPU --------------------------------------------------------------------------------------

def _layer(channels, device, affine=True):
    torch.manual_seed(0)
    m = IEBN2d(channels, affine=affine).to(device)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1.0, 1.0)
        if affine:
            m.weight.add_(1.5)
    return m


def _reference_grads(m, x, grad):
    params = [p.detach().double().requires_grad_() for p in (m.weight, m.bias, m.attn_weight, m.attn_bias)]
    xd = x.detach().double().requires_grad_()
    y = iebn_reference(xd, xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False), *params, m.eps)
    return y, torch.autograd.grad(y, [xd, *params], grad.double())


@pytest.fixture
def fused_calls(monkeypatch):
    from workbench.nn import triton_iebn

    calls = []
    original = triton_iebn.forward

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_iebn, "forward", spy)
    monkeypatch.delenv("WORKBENCH_FUSED", raising=False)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "channels_last", "tol"), [
    (torch.float32, False, 1e-4), (torch.float32, True, 1e-4), (torch.bfloat16, True, 3e-2),
    (torch.float16, False, 5e-3)])
@pytest.mark.parametrize("shape", [(128, 16, 32, 32), (1, 70, 9, 9), (8, 64, 64, 128), (4, 256, 1, 1)])
def test_cuda_fused_matches_formula(shape, dtype, channels_last, tol, fused_calls):
    m = _layer(shape[1], "cuda")
    x = torch.randn(*shape, device="cuda").mul_(2).add_(0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    y = m(x)
    assert fused_calls == [dtype] and y.dtype == dtype and y.stride() == x.stride()
    ref, ref_grads = _reference_grads(m, x, grad)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    got = torch.autograd.grad(y, [x, m.weight, m.bias, m.attn_weight, m.attn_bias], grad)
    for g, e in zip(got, ref_grads):
        # parameter gradients sum over N*H*W values: scale the tolerance by their magnitude
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * max(1.0, e.abs().max().item() * 1e-2))
    xd = x.detach().double()
    torch.testing.assert_close(m.running_mean.double(), 0.1 * xd.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.running_var.double(), 0.9 + 0.1 * xd.var((0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_open_gate_equals_batchnorm(fused_calls):
    m = _layer(64, "cuda")
    with torch.no_grad():
        m.attn_weight.zero_()
        m.attn_bias.fill_(30.0)
    bn = nn.BatchNorm2d(64).to("cuda")
    with torch.no_grad():
        bn.weight.copy_(m.weight)
        bn.bias.copy_(m.bias)
    for step in range(3):
        x = torch.randn(32, 64, 16, 16, device="cuda") + step
        xi, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        grad = torch.randn_like(x)
        yi, yb = m(xi), bn(xb)
        torch.testing.assert_close(yi, yb, rtol=1e-4, atol=1e-4)
        for a, b in zip(torch.autograd.grad(yi, [xi, m.weight, m.bias], grad),
                        torch.autograd.grad(yb, [xb, bn.weight, bn.bias], grad)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-5, atol=1e-5)
    assert len(fused_calls) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("switch", ["1", "eager"])
def test_cuda_compiled_layer_matches_eager(monkeypatch, switch):
    monkeypatch.setenv("WORKBENCH_FUSED", switch)
    torch._dynamo.reset()
    m = _layer(32, "cuda")
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(16, 32, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    xe = x.detach().clone().requires_grad_()
    y, ye = compiled(x), eager(xe)
    torch.testing.assert_close(y, ye, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-3, atol=1e-3)
    for p, pe in zip(m.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, pe.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m.running_mean, eager.running_mean)


@pytest.mark.gpu
def test_cuda_operator_passes_opcheck():
    x = torch.randn(8, 16, 12, 12, device="cuda").requires_grad_()
    params = [torch.rand(16, device="cuda").add_(0.5).requires_grad_() for _ in range(4)]
    torch.library.opcheck(torch.ops.workbench.iebn_fused_forward.default, (x, *params, 1e-5))
    torch.library.opcheck(torch.ops.workbench.iebn_fused_forward.default,
                          (x.detach().to(torch.bfloat16), None, None, params[2], params[3], 1e-5))
