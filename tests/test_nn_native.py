"""The C++ CPU kernel behind eager IEBN2d: taken when it can be, identical math, safe fallback."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import workbench.nn.functional as wf
from workbench.nn import IEBN2d, iebn_reference, native


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=dtype) * 2.0 + 0.5).requires_grad_()
    params = [(torch.rand(shape[1], generator=g, dtype=dtype) + 0.5).requires_grad_() for _ in range(4)]
    return x, params


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_native_kernel_is_built_and_taken_for_contiguous_float_input():
    assert native.iebn_cpu_available()
    x, (w, b, aw, ab) = _inputs((4, 3, 5, 5))
    assert wf._native_ready(x, w, b, aw, ab)
    assert wf._native_ready(x.double(), None, None, aw.double(), ab.double())
    assert not wf._native_ready(x.contiguous(memory_format=torch.channels_last), w, b, aw, ab)
    assert not wf._native_ready(x.bfloat16(), w.bfloat16(), b.bfloat16(), aw.bfloat16(), ab.bfloat16())
    assert not wf._native_ready(x, w.double(), b, aw, ab)


@pytest.mark.skipif(not native.iebn_cpu_available(), reason="native kernel unavailable")
@pytest.mark.parametrize("affine", [True, False])
def test_native_matches_python_path_and_formula(affine, monkeypatch):
    x, (w, b, aw, ab) = _inputs((8, 6, 7, 5), dtype=torch.float64)
    if not affine:
        w = b = None
    grads = {}
    for enabled in ("1", "0"):
        monkeypatch.setenv("WORKBENCH_NATIVE", enabled)
        xs = x.detach().clone().requires_grad_()
        y, mean, var = wf.iebn_train_fused(xs, w, b, aw, ab, 1e-5)
        torch.testing.assert_close(mean, x.detach().mean((0, 2, 3)))
        torch.testing.assert_close(var, x.detach().var((0, 2, 3), unbiased=False))
        ref = iebn_reference(xs, mean, var, w, b, aw, ab, 1e-5)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        tensors = [t for t in (xs, w, b, aw, ab) if t is not None]
        grads[enabled] = torch.autograd.grad(y.sin().sum(), tensors)
    for native_grad, python_grad in zip(grads["1"], grads["0"]):
        torch.testing.assert_close(native_grad, python_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not native.iebn_cpu_available(), reason="native kernel unavailable")
def test_native_gradcheck_and_frozen_input():
    x, params = _inputs((3, 2, 3, 2), dtype=torch.float64)
    torch.autograd.gradcheck(lambda *a: wf.iebn_train_fused(*a, 1e-5)[0], (x, *params))
    frozen = x.detach()
    y = wf.iebn_train_fused(frozen, *params, 1e-5)[0]
    grads = torch.autograd.grad(y.sum(), params)
    assert all(g is not None and g.shape == (2,) for g in grads)


@pytest.mark.skipif(not native.iebn_cpu_available(), reason="native kernel unavailable")
def test_native_results_do_not_depend_on_the_thread_count():
    # 64 x 32 planes of 8 x 8: enough planes for the kernel to split the work across threads.
    x, (w, b, aw, ab) = _inputs((64, 32, 8, 8))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xs = x.detach().clone().requires_grad_()
            y = wf.iebn_train_fused(xs, w, b, aw, ab, 1e-5)[0]
            results.append((y, *torch.autograd.grad(y.square().sum(), (xs, w, aw))))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.skipif(not native.iebn_cpu_available(), reason="native kernel unavailable")
def test_module_with_native_kernel_updates_running_stats_like_batchnorm(monkeypatch):
    m, ref = IEBN2d(4, momentum=0.3), IEBN2d(4, momentum=0.3)
    x = torch.randn(5, 4, 6, 6) * 3 + 1
    monkeypatch.setenv("WORKBENCH_NATIVE", "0")
    y_ref = ref(x)
    monkeypatch.setenv("WORKBENCH_NATIVE", "1")
    y = m(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert m.num_batches_tracked.item() == 1


def test_switch_off_and_bad_value(monkeypatch):
    monkeypatch.setenv("WORKBENCH_NATIVE", "off")
    assert not native.iebn_cpu_available()
    x, (w, b, aw, ab) = _inputs((2, 3, 4, 4))
    assert not wf._native_ready(x, w, b, aw, ab)
    monkeypatch.setenv("WORKBENCH_NATIVE", "maybe")
    with pytest.raises(ValueError, match="WORKBENCH_NATIVE='maybe'.*allowed"):
        native.native_enabled()


def test_build_failure_falls_back_to_python_with_a_warning(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise OSError("no compiler")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda *a, **k: "/nonexistent")
    native._load_iebn.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no compiler"):
            assert not native.iebn_cpu_available()
        m = IEBN2d(3)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        m(x).sum().backward()  # the pure-PyTorch path still trains
        assert x.grad is not None
    finally:
        native._load_iebn.cache_clear()


def test_ninja_from_the_dependency_is_found_without_an_activated_venv(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/nonexistent")
    native._put_ninja_on_path()
    assert shutil.which("ninja") is not None
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
