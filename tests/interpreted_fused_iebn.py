"""The fused IEBN kernels run by Triton's interpreter on CPU tensors, against the formula and
nn.BatchNorm2d. Triton decides at import whether ``@triton.jit`` compiles or interprets, so this
module runs only in a process started with ``TRITON_INTERPRET=1`` (``tests/test_nn_fused_cuda.py``
starts one); pytest does not collect it on its own.

Tolerances (float32 kernels against a float64 reference on the same float32 data): every value
passes through float32 sums of at most a few thousand terms (relative error ~ log2(K) * 1.2e-7,
about 1.5e-6) and the normalisation's chain rule subtracts terms of similar size (up to ~10x
amplification), so 1e-4 relative leaves a wide margin while any slip in the formula (a wrong
count, a missing term) moves results by 1e-2 or more.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)

import workbench.nn.fused_cuda as fc  # noqa: E402
from workbench.nn import IEBN2d, iebn_reference  # noqa: E402

# The interpreter's programs run one after another: a handful per sweep keeps the tests fast and
# still splits planes into several chunks (what the GPU does to fill its multiprocessors).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def fused_on_cpu(monkeypatch):
    """Route CPU tensors to the fused operator (the interpreter runs the kernels on them)."""
    monkeypatch.setattr(fc, "_fusable", lambda x: x.dtype in fc.FUSED_DTYPES)
    monkeypatch.delenv("WORKBENCH_FUSED", raising=False)
    from workbench.nn import triton_iebn

    calls = []
    original = triton_iebn.forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_iebn, "forward", spy)
    return calls


def _layer(channels: int, affine: bool = True, momentum: float | None = 0.1, seed: int = 0) -> IEBN2d:
    g = torch.Generator().manual_seed(seed)
    m = IEBN2d(channels, affine=affine, momentum=momentum)
    with torch.no_grad():
        if affine:
            m.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            m.bias.copy_(torch.rand(channels, generator=g) * 2 - 1)
        m.attn_weight.copy_(torch.rand(channels, generator=g) * 2 - 1)
        m.attn_bias.copy_(torch.rand(channels, generator=g) * 2 - 1)
    return m


def _input(shape, channels_last=False, seed=0, offset=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2.0 + offset).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _reference(m: IEBN2d, x: torch.Tensor, grad: torch.Tensor):
    """Output and gradients (input, then each parameter) of the formula in float64."""
    params = [p.detach().double().requires_grad_() if p is not None else None
              for p in (m.weight, m.bias, m.attn_weight, m.attn_bias)]
    xd = x.detach().double().requires_grad_()
    mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    y = iebn_reference(xd, mean, var, *params, m.eps)
    wanted = [xd] + [p for p in params if p is not None]
    return y, torch.autograd.grad(y, wanted, grad.double())


# N=1, C not a multiple of any tile (5, 70 > 64), H*W odd or prime (21, 1023), H*W = 1.
SHAPES = [(6, 5, 7, 3), (1, 3, 5, 5), (4, 70, 9, 9), (2, 3, 33, 31), (3, 5, 1, 1)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_gradients_and_running_stats_match_formula(shape, channels_last, fused_on_cpu):
    m = _layer(shape[1])
    x = _input(shape, channels_last).requires_grad_()
    grad = _input(shape, channels_last, seed=1)
    y = m(x)
    assert fused_on_cpu == [shape], "the fused kernels did not run"
    assert type(y.grad_fn).__name__ == "_EagerFusedIEBNBackward"  # eager: no dispatcher in between
    assert y.dtype == x.dtype and y.stride() == x.stride()
    ref, ref_grads = _reference(m, x, grad)
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)
    got = torch.autograd.grad(y, [x, m.weight, m.bias, m.attn_weight, m.attn_bias], grad)
    for name, g, e in zip(("input", "weight", "bias", "attn_weight", "attn_bias"), got, ref_grads):
        torch.testing.assert_close(g.double(), e, rtol=RTOL, atol=1e-4, msg=lambda s, n=name: f"{n}: {s}")
    xd = x.detach().double()
    torch.testing.assert_close(m.running_mean.double(), 0.1 * xd.mean((0, 2, 3)), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(m.running_var.double(), 0.9 + 0.1 * xd.var((0, 2, 3), unbiased=True),
                               rtol=RTOL, atol=ATOL)
    assert int(m.num_batches_tracked) == 1


def test_planes_split_into_chunks_are_merged(monkeypatch):
    """Many programs per plane (what a GPU gets at small batches): chunked moments and gradient
    sums are merged exactly."""
    from workbench.nn import triton_iebn

    monkeypatch.setattr(triton_iebn, "target_programs", lambda device: 64)
    shape = (2, 3, 40, 50)
    plan = triton_iebn.sweep_plan(2, 3, 2000, False, 64)
    assert plan.split > 1 and plan.split * plan.chunk >= 2000
    m = _layer(3)
    x = _input(shape, offset=3.0).requires_grad_()
    grad = _input(shape, seed=1)
    y = m(x)
    ref, ref_grads = _reference(m, x, grad)
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)
    got = torch.autograd.grad(y, [x, m.weight, m.bias, m.attn_weight, m.attn_bias], grad)
    for g, e in zip(got, ref_grads):
        torch.testing.assert_close(g.double(), e, rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_open_gate_equals_batchnorm(momentum):
    """attn_weight = 0 and attn_bias = 30: the gate is sigmoid(30) = 1 in float32, so IEBN is BN:
    output, gradients and running statistics over several steps (momentum=None: cumulative)."""
    m = _layer(6, momentum=momentum)
    with torch.no_grad():
        m.attn_weight.zero_()
        m.attn_bias.fill_(30.0)
    bn = nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(m.weight)
        bn.bias.copy_(m.bias)
    for step in range(3):
        x = _input((4, 6, 5, 3), seed=step, offset=step - 1.0)
        xi, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        grad = _input(x.shape, seed=10 + step)
        yi, yb = m(xi), bn(xb)
        torch.testing.assert_close(yi, yb, rtol=1e-5, atol=1e-5)
        gi = torch.autograd.grad(yi, [xi, m.weight, m.bias], grad)
        gb = torch.autograd.grad(yb, [xb, bn.weight, bn.bias], grad)
        for a, b in zip(gi, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == 3


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter: sigmoid(-inf)
def test_non_affine_large_mean_and_strided_input():
    m = _layer(4, affine=False)
    # mean 1000, std 2: a one-pass E[x^2] - E[x]^2 in float32 would lose the variance entirely.
    x = _input((5, 4, 6, 8), offset=1000.0)[:, :, ::2].requires_grad_()
    assert not x.is_contiguous()
    grad = _input(x.shape, seed=2)
    y = m(x)
    ref, ref_grads = _reference(m, x, grad)
    # x itself carries float32 rounding of 1000 * 6e-8 = 6e-5 per value, i.e. ~3e-5 of its spread.
    torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=1e-3)
    got = torch.autograd.grad(y, [x, m.attn_weight, m.attn_bias], grad)
    for g, e in zip(got, ref_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    m = _layer(5)
    x = _input((4, 5, 6, 7), dtype=dtype).requires_grad_()
    grad = _input(x.shape, seed=1, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    ref, ref_grads = _reference(m, x, grad)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per stored value; fp16 11 bits).
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    got = torch.autograd.grad(y, [x, m.weight, m.bias, m.attn_weight, m.attn_bias], grad)
    assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[1:])
    for g, e in zip(got, ref_grads):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * 5)


def test_switch_off_and_eval_mode_take_the_pytorch_ops(monkeypatch, fused_on_cpu):
    m = _layer(3)
    x = _input((4, 3, 5, 5))
    monkeypatch.setenv("WORKBENCH_FUSED", "0")
    expected = m(x)
    assert fused_on_cpu == []
    monkeypatch.setenv("WORKBENCH_FUSED", "1")
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    assert len(fused_on_cpu) == 1
    m.eval()
    m(x)
    assert len(fused_on_cpu) == 1


def _graph_ops(model, x):
    """The call targets of the graph dynamo captures for ``model(x)`` (fullgraph: no breaks)."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=backend)(x)
    return targets


def test_compiled_graph_holds_one_fused_operator_and_matches_eager(monkeypatch):
    m = _layer(5)
    assert any("iebn_fused_forward" in t for t in _graph_ops(copy.deepcopy(m), _input((4, 5, 6, 6))))
    monkeypatch.setenv("WORKBENCH_FUSED", "eager")
    assert not any("iebn_fused_forward" in t for t in _graph_ops(copy.deepcopy(m), _input((4, 5, 6, 6))))
    monkeypatch.setenv("WORKBENCH_FUSED", "1")
    torch._dynamo.reset()
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = _input((4, 5, 6, 6)).requires_grad_()
    xe = x.detach().clone().requires_grad_()
    y, ye = compiled(x), eager(xe)
    torch.testing.assert_close(y, ye, rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-5, atol=1e-6)
    for p, pe in zip(m.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, pe.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, eager.running_var)


def test_operator_registration_passes_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    x = _input((3, 4, 5, 5)).requires_grad_()
    params = [torch.rand(4).add_(0.5).requires_grad_() for _ in range(4)]
    forward = torch.ops.workbench.iebn_fused_forward.default
    torch.library.opcheck(forward, (x, *params, 1e-5))
    torch.library.opcheck(forward, (x.detach(), None, None, params[2], params[3], 1e-5))
    y, channel_stats, plane_stats = fc.iebn_fused_forward(x.detach(), *params, 1e-5)
    grad = torch.randn_like(y)
    torch.library.opcheck(torch.ops.workbench.iebn_fused_backward.default,
                          (grad, x.detach(), params[0].detach(), params[2].detach(), channel_stats, plane_stats, True))


def test_torch_func_transforms_keep_the_pytorch_ops(fused_on_cpu):
    """vmap/grad (the micro-batch probes) cannot batch an opaque operator: eager and compiled they
    take the composite formula, and the gradients match a loop over the micro-batches."""
    m = _layer(3)
    torch.func.replace_all_batch_norm_modules_(m)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(m, p, (x,)).square().sum()

    per_micro = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    x = _input((4, 2, 3, 5, 5))
    torch._dynamo.reset()
    for fn in (per_micro, torch.compile(per_micro, backend="aot_eager", fullgraph=True)):
        grads = fn(params, x)
        for k in range(x.shape[0]):
            expected = torch.func.grad(loss)(params, x[k])
            for name in params:
                torch.testing.assert_close(grads[name][k], expected[name], rtol=1e-4, atol=1e-5)
    assert fused_on_cpu == []
